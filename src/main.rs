use clap::Parser;

/// mimalloc instead of glibc's malloc: with many connections and worker
/// threads glibc's per-thread arenas fragmented (RSS) and its free lists cost
/// CPU (`unlink_chunk`, `malloc_consolidate` were the top symbols serving a
/// fleet); see docs/performance.md. Without the `mimalloc` feature the
/// system allocator is used (heap profilers such as heaptrack can see it).
///
/// Built with mimalloc's `no_thp` (Cargo.toml): mimalloc otherwise asks for
/// transparent huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), and each
/// 2 MiB page that holds anything is resident whole: 36 MiB idle and 147–162
/// MiB at 1,000 proxies with them, 22–24 and 107–109 MiB without; at 10,000
/// proxies the sync's peak was 1,097 MiB with them and 870 MiB without, for
/// no more CPU (docs/performance.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = meshpilot::cli::Cli::parse();
    match meshpilot::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("meshpilot: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
