//! `p0rt`: command-line entry point. All logic lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use p0rt::config::{Config, ServeArgs};

/// Self-hosted SSH reverse-tunnel host.
///
/// Users run stock OpenSSH, `ssh -p 2222 -R 80:localhost:3000 <host>`, and get a stable
/// public name such as http://whale-guitar-fox.<domain> bound to their SSH key.
///
/// Settings are layered: built-in defaults < YAML file (--config) < environment < flags.
#[derive(Parser, Debug)]
#[command(name = "p0rt", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the host (the default when no command is given)
    Serve(ServeArgs),
}

/// Exit code for configuration errors (same as for bad command-line flags).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,russh=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    let config = match Config::load(&args, &|var| std::env::var(var).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("p0rt: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("p0rt: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(p0rt::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p0rt: {e:#}");
            ExitCode::FAILURE
        }
    }
}
