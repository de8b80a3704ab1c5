//! The `ssegw-loadtest` binary: parses the command line, runs the harness (or a worker shard)
//! and turns the report into output files and an exit status: 0 when every SLO held, 1 when
//! one was violated, 2 for bad flags, 3 when the run could not be carried out.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use ssegw_loadtest::config::{Cli, Hidden};
use ssegw_loadtest::{chart, raise_open_file_limit, report, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Hidden::Worker) = cli.command {
        return ssegw_loadtest::worker::main();
    }
    let plan = match cli.run.into_plan() {
        Ok(plan) => plan,
        Err(message) => Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit(),
    };
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.args.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ssegw-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(run::run(plan.clone()));
    // Connection tasks may still be winding down; don't wait for them.
    runtime.shutdown_background();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("ssegw-loadtest: {e:#}");
            return ExitCode::from(3);
        }
    };
    print!("{}", report::summary(&report));
    if let Some(path) = &plan.args.report {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|json| std::fs::write(path, json).map_err(Into::into));
        if let Err(e) = written {
            eprintln!("ssegw-loadtest: cannot write {}: {e}", path.display());
            return ExitCode::from(3);
        }
    }
    if let Some(path) = &plan.args.chart {
        let s = &report.settings;
        let title = format!(
            "{}: {:?}, {} connections, {} events/s",
            s.target.name(),
            report.scenario,
            s.connections,
            s.rate
        );
        if let Err(e) = chart::write_svg(path, &title, &report.intervals) {
            eprintln!("ssegw-loadtest: cannot write {}: {e:#}", path.display());
            return ExitCode::from(3);
        }
    }
    if report.slo.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
