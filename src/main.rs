//! The `ostp` binary: parses the command line and runs the chosen command.

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match ostp::cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ostp: {e}");
            return ExitCode::from(2);
        }
    };
    match ostp::runtime::execute(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ostp: {e}");
            ExitCode::from(1)
        }
    }
}
