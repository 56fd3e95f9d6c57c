//! The live view of one job until it ends: a progress bar of its phase and analyzer step on a
//! terminal, a line per change elsewhere (or a JSON object per change). Used by
//! `submit --follow`, `job --follow` and the demo.

use std::{io::IsTerminal as _, time::Duration};

use fondation_proto::pb;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{
    args::OutputFormat,
    connection::{Admin, CliError},
    output,
};

/// How often the job is read again. The coordinator coalesces progress writes over a few hundred
/// milliseconds, so reading faster shows nothing more.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long the view waits out a coordinator that cannot be reached (a restart) before giving up.
const UNAVAILABLE_GRACE: Duration = Duration::from_secs(30);
/// The analyzer's steps (the CLI contract's `[FONDATION_STEP_N/6]`).
const TOTAL_STEPS: u64 = 6;

/// Statuses after which a job does not change any more.
pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "dead" | "canceled")
}

/// What a person sees change about a job; a new one is shown only when this differs.
#[derive(PartialEq, Eq)]
struct Shown {
    status: String,
    step: u32,
    progress: String,
    agent_id: String,
    attempts: u32,
}

impl Shown {
    fn of(job: &pb::Job) -> Self {
        Shown {
            status: job.status.clone(),
            step: job.current_step,
            progress: job.progress.clone(),
            agent_id: job.agent_id.clone(),
            attempts: job.attempts,
        }
    }

    fn text(&self) -> String {
        let mut text = self.status.clone();
        if !self.progress.is_empty() {
            text.push_str(": ");
            text.push_str(&self.progress);
        }
        if !self.agent_id.is_empty() {
            text.push_str(&format!(" (on {}", self.agent_id));
            if self.attempts > 1 {
                text.push_str(&format!(", attempt {}", self.attempts));
            }
            text.push(')');
        }
        text
    }
}

enum View {
    Bar(ProgressBar),
    Lines,
    Json,
}

impl View {
    fn new(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Json => View::Json,
            OutputFormat::Text if std::io::stderr().is_terminal() => {
                let bar =
                    ProgressBar::with_draw_target(Some(TOTAL_STEPS), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed:>4} [{bar:20}] step {pos}/{len} {wide_msg}",
                    )
                    .expect("the template is valid")
                    .progress_chars("=> "),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
                View::Bar(bar)
            }
            OutputFormat::Text => View::Lines,
        }
    }

    fn show(&self, job: &pb::Job, shown: &Shown) -> Result<(), CliError> {
        match self {
            View::Bar(bar) => {
                bar.set_position(u64::from(shown.step).min(TOTAL_STEPS));
                bar.set_message(shown.text());
            }
            View::Lines => output::print_line(&format!(
                "{} step {}/{TOTAL_STEPS} {}",
                output::time(job.updated_at.as_ref()),
                shown.step,
                shown.text()
            ))?,
            View::Json => output::print_line(&output::json_line(job, "Job"))?,
        }
        Ok(())
    }

    fn finish(&self) {
        if let View::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Shows `job_id` until it ends and returns it as it ended; a job that ended other than
/// completed is a [`CliError::JobFailed`] carrying its error.
pub async fn follow_job(
    admin: &mut Admin,
    url: &str,
    job_id: &str,
    format: OutputFormat,
) -> Result<pb::Job, CliError> {
    let view = View::new(format);
    let result = watch(admin, url, job_id, &view).await;
    view.finish();
    let job = result?;
    if job.status == "completed" {
        if format == OutputFormat::Text {
            output::print_line(&summary(&job))?;
        }
        Ok(job)
    } else {
        Err(CliError::JobFailed {
            job_id: job.job_id,
            status: job.status,
            error: if job.error.is_empty() {
                "no error was recorded".into()
            } else {
                job.error
            },
        })
    }
}

async fn watch(
    admin: &mut Admin,
    url: &str,
    job_id: &str,
    view: &View,
) -> Result<pb::Job, CliError> {
    let mut last: Option<Shown> = None;
    let mut unavailable_since: Option<tokio::time::Instant> = None;
    loop {
        let request = pb::GetJobRequest {
            job_id: job_id.to_string(),
            include_content: false,
        };
        match admin.get_job(request).await {
            Ok(response) => {
                unavailable_since = None;
                let job = response.into_inner();
                let shown = Shown::of(&job);
                if last.as_ref() != Some(&shown) {
                    view.show(&job, &shown)?;
                    last = Some(shown);
                }
                if is_final(&job.status) {
                    return Ok(job);
                }
            }
            // A coordinator restarting comes back with the job: wait for it a while.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                let since = *unavailable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > UNAVAILABLE_GRACE {
                    return Err(CliError::from_status(status, url));
                }
            }
            Err(status) => return Err(CliError::from_status(status, url)),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The line printed when a followed job completed.
fn summary(job: &pb::Job) -> String {
    let took = match (job.started_at, job.ended_at) {
        (Some(start), Some(end)) => {
            let span = prost_types::Duration {
                seconds: end.seconds - start.seconds,
                nanos: end.nanos - start.nanos,
            };
            format!(" in {}", output::duration(Some(&span)))
        }
        _ => String::new(),
    };
    // Without the job id, already shown when it was queued: the line fits 80 columns.
    format!(
        "completed{took} after {} attempt(s): {} documents",
        job.attempts,
        job.documents.len()
    )
}
