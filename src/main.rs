use clap::Parser;

/// mimalloc instead of glibc's malloc: with many connections and worker
/// threads glibc's per-thread arenas fragmented (RSS) and its free lists cost
/// CPU (`unlink_chunk`, `malloc_consolidate` were the top symbols serving a
/// fleet); see docs/performance.md. Without the `mimalloc` feature the
/// system allocator is used (heap profilers such as heaptrack can see it).
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
