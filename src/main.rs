//! The `ostp` binary: parses the command line, runs the chosen command, and maps failures to exit
//! codes (2 = usage, 78 = config file, 1 = anything else).

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match ostp::cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ostp: {e}");
            return ExitCode::from(ostp::cli::EXIT_USAGE);
        }
    };
    match ostp::runtime::execute(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ostp: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
