//! `thymisctl`: a thin shim over the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match thymisctl::run(thymisctl::Cli::parse()) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("thymisctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
