//! `thymis-controller`: a thin shim over the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match thymis_controller::main(thymis_controller::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thymis-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
