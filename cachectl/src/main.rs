//! `cachectl`: look into a cache-runtime cache on Redis. `cachectl --help` lists the
//! commands, options and exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => {
                eprintln!("cachectl: argument {arg:?} is not UTF-8; see cachectl --help");
                return ExitCode::from(cachectl::EXIT_USAGE as u8);
            }
        }
    }
    let code = cachectl::run(
        args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
