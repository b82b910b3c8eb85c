//! One-shot instances: create → start → wait (bounded) → output → destroy. Migrations,
//! `kiln test`'s command and anything else that runs once to completion use this, so the
//! sequence and its clean-up live in one place.

use std::time::Duration;

use kiln_runtime::{InstanceId, InstanceSpec, Provider, ProviderError};

/// How a one-shot instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// Its process exited with this status (`None`: the provider could not see it).
    Exited(Option<i32>),
    /// It was still running at the deadline.
    TimedOut,
    /// The caller's interrupt fired first.
    Interrupted,
}

/// A one-shot instance's outcome.
#[derive(Debug, Clone)]
pub struct OneShot {
    /// The instance (destroyed by now).
    pub id: InstanceId,
    /// How it ended.
    pub finished: Finished,
    /// The last `tail` bytes of its output.
    pub output: String,
    /// Why it could not be removed afterwards, if it could not.
    pub destroy_error: Option<String>,
}

impl OneShot {
    /// Whether it exited 0.
    pub fn succeeded(&self) -> bool {
        self.finished == Finished::Exited(Some(0))
    }

    /// Why it did not succeed, with the tail of its output, for a person.
    pub fn failure(&self) -> Option<String> {
        let why = match &self.finished {
            Finished::Exited(Some(0)) => return None,
            Finished::Exited(Some(code)) => format!("exit {code}"),
            Finished::Exited(None) => "exit unknown".to_owned(),
            Finished::TimedOut => "did not finish in time".to_owned(),
            Finished::Interrupted => "interrupted".to_owned(),
        };
        Some(format!("{why}: {}", self.output.trim()))
    }
}

/// Runs `spec` once: started, then awaited until it exits, `deadline` passes or `interrupt`
/// resolves. The start itself is never cut short (one dropped half-way could leave a process
/// behind). Whatever happens after create, the instance is stopped and destroyed before this
/// returns; a failed destroy is reported in [`OneShot::destroy_error`], beside the outcome.
pub async fn run_once(
    provider: &dyn Provider,
    spec: InstanceSpec,
    deadline: tokio::time::Instant,
    tail: usize,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<OneShot, ProviderError> {
    let id = provider.create(spec).await?;
    let ran = async {
        provider.start(&id).await?;
        tokio::select! {
            biased;
            () = interrupt => Ok(Finished::Interrupted),
            waited = tokio::time::timeout_at(deadline, provider.wait(&id)) => match waited {
                Ok(code) => Ok(Finished::Exited(code?)),
                Err(_) => Ok(Finished::TimedOut),
            },
        }
    }
    .await;
    let output = output_tail(provider, &id, tail).await;
    // Stopping an exited instance does nothing; one still running gets a short grace.
    let _stopped = provider.stop(&id, Duration::from_secs(1)).await;
    let destroyed = provider.destroy(&id).await;
    let finished = ran?;
    Ok(OneShot {
        id,
        finished,
        output,
        destroy_error: destroyed.err().map(|e| e.to_string()),
    })
}

/// The last `tail` bytes of an instance's output.
pub async fn output_tail(provider: &dyn Provider, id: &InstanceId, tail: usize) -> String {
    let mut data = Vec::new();
    let mut from = 0;
    while let Ok(chunk) = provider.logs(id, from).await {
        if chunk.data.is_empty() {
            break;
        }
        data.extend_from_slice(&chunk.data);
        from = chunk.next;
    }
    let start = data.len().saturating_sub(tail);
    String::from_utf8_lossy(&data[start..]).into_owned()
}
