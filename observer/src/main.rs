//! The `observer` binary: parse flags, set up logging, run until SIGINT/SIGTERM.
//! Every failure ends as one line on stderr and a non-zero exit code.

use std::process::ExitCode;

use clap::Parser as _;
use observer::{
    cli::{Cli, Command},
    error::Error,
    shutdown,
};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and exit 0.
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => return usage_error(&error),
    };
    let level = cli.common.log_level.filter();
    env_logger::Builder::new()
        .filter_level(level)
        // aya narrates every relocation at debug level; keep that for --log.level=trace.
        .filter_module("aya", level.min(log::LevelFilter::Info))
        .filter_module("aya_obj", level.min(log::LevelFilter::Info))
        .format_target(false)
        .init();
    // Threads of the runtime's pool (bcrypt) hold no capability (see kernel::privileges).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(observer::kernel::privileges::drop_all_on_this_thread)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return fail(&Error::Io { context: "cannot start the runtime", source: error });
        }
    };
    let result = runtime.block_on(async {
        let token = CancellationToken::new();
        shutdown::cancel_on_signals(token.clone())
            .map_err(|source| Error::Io { context: "cannot install signal handlers", source })?;
        match cli.command {
            None => observer::daemon::run(cli.daemon, cli.common, token).await,
            Some(Command::Watch(args)) => observer::watch::run(args, cli.common, token).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// clap's message is several lines (tip, usage); ours is its first line.
fn usage_error(error: &clap::Error) -> ExitCode {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or("invalid command line");
    eprintln!("observer: {} (see observer --help)", first.trim_start_matches("error: "));
    ExitCode::from(observer::error::USAGE_EXIT)
}

fn fail(error: &Error) -> ExitCode {
    eprintln!("observer: {}", error.one_line());
    ExitCode::from(error.exit_code())
}
