//! The `sauna-supervisor` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    sauna_supervisor::cli::main()
}
