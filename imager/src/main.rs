//! `thymis-imager`: a thin shim over the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match thymis_imager::run(thymis_imager::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thymis-imager: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
