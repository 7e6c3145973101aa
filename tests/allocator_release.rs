//! `allocator::release_freed_memory` really hands freed heap memory
//! back to the kernel, with mimalloc as the global allocator as in the
//! binary. (Its own test binary: it reads the process's RSS.)

use std::hint::black_box;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).expect("RssAnon in /proc/self/status");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("RssAnon in kB")
}

/// mimalloc 3's `mi_option_purge_decommits` and `mi_option_purge_delay`
/// (the order of `mi_option_e` in its `mimalloc.h`; `libmimalloc-sys` names
/// neither, the test checks their neighbours).
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[test]
fn memory_a_thread_freed_goes_back_to_the_kernel_on_release() {
    const BLOCKS: usize = 16 * 1024;
    const BLOCK_BYTES: usize = 4 * 1024; // 64 MiB in small blocks, as a sync's buffers are
    assert_eq!(MI_OPTION_PURGE_DECOMMITS, libmimalloc_sys::mi_option_large_os_pages - 1);
    assert_eq!(MI_OPTION_PURGE_DELAY, libmimalloc_sys::mi_option_use_numa_nodes - 1);
    // Whatever MIMALLOC_* says and however slow this machine is: a purge
    // decommits, and nothing is purged on its own during the test.
    // SAFETY: setting an option takes no pointers.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 1);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 60_000);
    }
    std::thread::spawn(|| {
        let before = resident_kib();
        let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8; BLOCK_BYTES]).collect();
        black_box(&blocks);
        let held = resident_kib();
        assert!(held >= before + 48 * 1024, "64 MiB of blocks should be resident: {before} KiB before, {held} KiB held");
        drop(blocks);
        // mimalloc keeps the freed pages (its purge waits for the delay
        // and for this thread to hand back or allocate more)...
        let freed = resident_kib();
        assert!(
            freed >= before + 48 * 1024,
            "mimalloc returned the pages at once ({freed} KiB after the free, {held} KiB held): this test no longer tests anything"
        );
        // ...until the thread goes idle.
        meshpilot::allocator::release_freed_memory();
        let released = resident_kib();
        assert!(released + 48 * 1024 <= freed, "the freed pages stayed resident: {freed} KiB before the release, {released} KiB after");
    })
    .join()
    .expect("the allocating thread");
}
