//! `nextgate`: parse the command line, load the configuration, run the gateway.

use clap::Parser;
use nextgate::config::{LogFormat, Settings};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of the system allocator: the proxy allocates and frees many small buffers
/// per request, and glibc malloc showed up at ~12% of proxy CPU in profiles (README, Benchmarks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// NextDeveloper API Gateway: edge proxy with an app registry.
#[derive(Debug, Parser)]
#[command(name = "nextgate", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it the built-in defaults apply.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration and exit (non-zero with the offending key when invalid).
    #[arg(short = 't', long = "test")]
    test: bool,
    /// State directory (overrides `server.state_dir`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

fn init_logging(s: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&s.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match s.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[allow(clippy::print_stdout)] // `-t` answers on stdout, like `nginx -t`
fn main() -> ExitCode {
    let cli = Cli::parse();
    let label = cli.config.as_ref().map_or_else(
        || "built-in defaults".to_string(),
        |p| p.display().to_string(),
    );
    let loaded = match &cli.config {
        Some(path) => Settings::load(path),
        None => Settings::from_file(Default::default()),
    };
    let mut settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nextgate: configuration error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(dir) = cli.state_dir {
        settings.pid_file = dir.join("nextgate.pid");
        settings.upgrade_sock = dir.join("nextgate-upgrade.sock");
        settings.state_dir = dir;
    }
    if cli.test {
        println!("nextgate: configuration {label} is ok");
        return ExitCode::SUCCESS;
    }
    init_logging(&settings);
    match nextgate::app::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nextgate: cannot start: {e}");
            ExitCode::from(1)
        }
    }
}
