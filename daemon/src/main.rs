//! `thymis-agent`: a thin shim over the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match thymis_agent::main(thymis_agent::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thymis-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
