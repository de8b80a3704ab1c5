//! Worker processes, for runs with more connections than one process may hold files: the
//! harness re-executes itself as `ssegw-loadtest worker`, sends it a `ShardPlan` and then
//! `ToShard` commands as JSON lines on its stdin, and reads `ShardReport`s as JSON lines from
//! its stdout. A worker whose stdin closes (the harness is gone) stops.

use std::process::{ExitCode, Stdio};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::client::{self, ShardPlan, ShardReport, ToShard};

/// A running worker process; killed when dropped.
pub struct Worker {
    child: Child,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// Starts a worker for `plan`: `commands` are forwarded to it, its reports go to `reports`.
pub async fn spawn(
    plan: &ShardPlan,
    mut commands: mpsc::Receiver<ToShard>,
    reports: mpsc::Sender<ShardReport>,
) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("cannot find the harness executable")?;
    let mut command = Command::new(exe);
    command
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    crate::fleet::die_with_parent(command.as_std_mut(), libc::SIGKILL);
    let mut child = command.spawn().context("cannot start a worker process")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut first = serde_json::to_string(plan)?;
    first.push('\n');
    stdin.write_all(first.as_bytes()).await?;
    tokio::spawn(async move {
        while let Some(command) = commands.recv().await {
            let Ok(mut line) = serde_json::to_string(&command) else {
                break;
            };
            line.push('\n');
            if stdin.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ShardReport>(&line) {
                Ok(report) => {
                    if reports.send(report).await.is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("ssegw-loadtest: unreadable worker report: {e}"),
            }
        }
    });
    Ok(Worker { child })
}

/// `ssegw-loadtest worker`: runs one shard for the parent harness.
pub fn main() -> ExitCode {
    let mut first = String::new();
    if std::io::stdin().read_line(&mut first).is_err() {
        return ExitCode::FAILURE;
    }
    let plan: ShardPlan = match serde_json::from_str(&first) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("ssegw-loadtest worker: bad plan: {e}");
            return ExitCode::FAILURE;
        }
    };
    crate::raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ssegw-loadtest worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // stdin lines -> the shard: one `Finish` per run, so a small buffer is plenty.
        let (command_tx, command_rx) = mpsc::channel(4);
        // The shard -> stdout lines; the shard waits when the parent reads slowly.
        let (report_tx, mut report_rx) = mpsc::channel::<ShardReport>(64);
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(command) = serde_json::from_str::<ToShard>(&line) else {
                    break;
                };
                if command_tx.send(command).await.is_err() {
                    break;
                }
            }
            // Dropping `command_tx` here ends the shard: the parent is gone or confused.
        });
        let writer = tokio::spawn(async move {
            let mut stdout = tokio::io::stdout();
            while let Some(report) = report_rx.recv().await {
                let mut line = serde_json::to_string(&report)?;
                line.push('\n');
                stdout.write_all(line.as_bytes()).await?;
                stdout.flush().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
        client::run_shard(plan, command_rx, report_tx).await?;
        writer.await?
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssegw-loadtest worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
