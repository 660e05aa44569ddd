//! The `segmentd` command: the daemon and the operator's commands around it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use segmentd::config::Config;
use segmentd::store::Store;

/// Batch audience segmentation and activation on embedded DuckDB.
#[derive(Debug, Parser)]
#[command(name = "segmentd", version)]
struct Cli {
    /// The daemon's configuration file.
    #[arg(
        long,
        global = true,
        env = "SEGMENTD_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,

    /// Log lines as JSON instead of text.
    #[arg(long, global = true)]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the daemon: schedules, HTTP triggers and profile look-ups.
    Run,
    /// Runs one pipeline now, in this process, and prints a summary.
    Refresh {
        /// The pipeline's name (its folder under pipelines/).
        pipeline: String,
        /// Evaluate at this wall-clock time in the pipeline's time zone instead of its
        /// pinned `as_of` or now, e.g. "2011-12-09 12:50:00".
        #[arg(long)]
        as_of: Option<String>,
        /// Accept a refresh that the pipeline's guards would refuse (an empty or shrunken
        /// master segment).
        #[arg(long)]
        force: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows what a run would do now (sizes, adds and removes per activation) without
    /// changing any state or sending anything.
    Plan {
        /// The pipeline's name.
        pipeline: String,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows a segment's size, a sample of its members and its compiled SQL, evaluated on the
    /// current master segment; changes no state and touches no activation.
    Preview {
        /// The pipeline's name.
        pipeline: String,
        /// The segment's name (`folder/name`).
        segment: String,
        /// How many member keys to show.
        #[arg(long, default_value_t = 10)]
        sample: usize,
        /// Print the preview as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approves a run's held deltas (held by a brake: removal share or minimum audience) and
    /// delivers them; says what became of a delta a newer run superseded.
    Approve {
        /// The pipeline's name.
        pipeline: String,
        /// The run whose delta was held.
        run: i64,
        /// Only this activation (`<segment>/<name>`); default: every held activation.
        activation: Option<String>,
    },
    /// Lists members the platforms keep rejecting; `--retry` offers them again next run.
    Deadletter {
        /// The pipeline's name.
        pipeline: String,
        /// Release the dead letter (of one activation with --activation) for the next run.
        #[arg(long)]
        retry: bool,
        /// Limit --retry to this activation.
        #[arg(long)]
        activation: Option<String>,
    },
    /// Shows when a profile entered and left a segment, in which run and why.
    History {
        /// The pipeline's name.
        pipeline: String,
        /// The segment's name.
        segment: String,
        /// The profile key.
        key: String,
    },
    /// Checks config.toml and every pipeline; reports every problem and exits non-zero if any.
    Validate,
    /// Lists a pipeline's segments with their folders and last sizes.
    Segments {
        /// The pipeline's name.
        pipeline: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEGMENTD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|problems| anyhow::anyhow!("{problems}"))
}

fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    let daemon = &config.daemon;
    Ok(Arc::new(Store::open(
        &daemon.database,
        &daemon.memory_limit,
        daemon.threads,
    )?))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate => validate(&cli.config),
        Command::Run => {
            let config = load(&cli.config)?;
            let store = open_store(&config)?;
            runtime()?.block_on(async move {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("stop requested; finishing the current step");
                    stop.cancel();
                });
                segmentd::daemon::serve(config, store, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Refresh {
            pipeline,
            as_of,
            force,
            json,
        } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?.clone();
            let as_of = match as_of {
                Some(text) => Some(
                    segmentd::config::pipeline::parse_wall_time(&text).with_context(|| {
                        format!("--as-of `{text}` is not a time such as \"2011-12-09 12:50:00\"")
                    })?,
                ),
                None => None,
            };
            let store = open_store(&config)?;
            let options = segmentd::runner::RunOptions { as_of, force };
            let summary = runtime()?.block_on(segmentd::runner::run(
                store,
                &config,
                &definition,
                "cli",
                options,
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.to_table());
            }
            let ok = matches!(summary.status.as_str(), "succeeded" | "held");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Plan { pipeline, json } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?;
            let store = open_store(&config)?;
            let as_of = segmentd::runner::as_of_for(definition, None);
            let plan = segmentd::plan::plan(&store.connection()?, definition, as_of)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.to_table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Preview {
            pipeline,
            segment,
            sample,
            json,
        } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?;
            definition.segment(&segment)?;
            let store = open_store(&config)?;
            let as_of = segmentd::runner::as_of_for(definition, None);
            let preview = segmentd::evaluate::preview(
                &store.connection()?,
                definition,
                &segment,
                as_of,
                sample,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&preview)?);
            } else {
                println!(
                    "segment {} at {}: {} members",
                    preview.segment, preview.as_of, preview.size
                );
                println!("sample: {}", preview.sample.join(", "));
                println!("\nSQL:\n{}", preview.sql);
                println!("\nparameters, in order: {}", preview.params.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve {
            pipeline,
            run,
            activation,
        } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?.clone();
            let store = open_store(&config)?;
            let delivered = runtime()?.block_on(segmentd::runner::approve(
                store,
                &config,
                &definition,
                run,
                activation,
            ))?;
            let mut failed = false;
            for a in &delivered {
                failed |= a.error.is_some();
                println!(
                    "{}: {} adds and {} removes delivered, {} rejected{}",
                    a.activation,
                    a.delivered_adds,
                    a.delivered_removes,
                    a.rejected,
                    a.error
                        .as_deref()
                        .map(|e| format!("; {e}"))
                        .unwrap_or_default()
                );
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Deadletter {
            pipeline,
            retry,
            activation,
        } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?;
            let store = open_store(&config)?;
            let connection = store.connection()?;
            if retry {
                let released = segmentd::deliver::retry_dead_letters(
                    &connection,
                    &definition.name,
                    activation.as_deref(),
                )?;
                println!("{released} members released; the next run offers them again");
                return Ok(ExitCode::SUCCESS);
            }
            let rows = segmentd::deliver::dead_letters(&connection, &definition.name)?;
            println!(
                "{:<40}  {:<12}  {:<6}  {:>10}  {:>6}  reason",
                "activation", "key", "change", "rejections", "run"
            );
            for row in rows {
                println!(
                    "{:<40}  {:<12}  {:<6}  {:>10}  {:>6}  {}",
                    row.activation, row.key, row.change, row.rejections, row.run_id, row.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            pipeline,
            segment,
            key,
        } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?;
            definition.segment(&segment)?;
            let store = open_store(&config)?;
            let events = segmentd::evaluate::history(
                &store.connection()?,
                &definition.name,
                &segment,
                &key,
            )?;
            if events.is_empty() {
                println!("profile `{key}` has never been a member of `{segment}`");
            }
            for event in events {
                println!(
                    "run {:>6}  {:<8}  {:<17}  {}",
                    event.run_id, event.event, event.reason, event.at
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Segments { pipeline } => {
            let config = load(&cli.config)?;
            let definition = config.pipeline(&pipeline)?;
            let store = open_store(&config)?;
            let sizes = segmentd::store::last_sizes(&store.connection()?, &definition.name)?;
            let width = definition
                .segments
                .iter()
                .map(|s| s.name.len())
                .max()
                .unwrap_or(7)
                .max(7);
            println!(
                "{:<width$}  {:<20}  {:>9}  {:>8}  activations",
                "segment", "folder", "size", "run"
            );
            for segment in &definition.segments {
                let (size, run) = match sizes.get(&segment.name) {
                    Some((size, run)) => (size.to_string(), run.to_string()),
                    None => ("-".into(), "-".into()),
                };
                let folder = if segment.folder().is_empty() {
                    "/"
                } else {
                    segment.folder()
                };
                println!(
                    "{:<width$}  {:<20}  {:>9}  {:>8}  {}",
                    segment.name,
                    folder,
                    size,
                    run,
                    segment.activations.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(config) => {
            for pipeline in config.pipelines.values() {
                let activations: usize =
                    pipeline.segments.iter().map(|s| s.activations.len()).sum();
                println!(
                    "pipeline `{}`: {} sources, {} segments, {} activations",
                    pipeline.name,
                    pipeline.sources.len(),
                    pipeline.segments.len(),
                    activations
                );
                if let Some(schedule) = &pipeline.schedule {
                    let fires: Vec<String> = segmentd::scheduler::next_fires(schedule, 3)
                        .iter()
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .collect();
                    println!("  schedule `{schedule}`, next: {}", fires.join(", "));
                }
            }
            println!("configuration is valid");
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            eprint!("{problems}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
