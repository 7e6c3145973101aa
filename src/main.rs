use clap::Parser;

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
