//! The registry of connected agents: their slots, what they run, and how to reach them.
//!
//! Slot accounting lives here so that the claim loop only claims while some agent can take the
//! job, and so that no agent is ever handed more assignments than it announced slots.
//!
//! So does the defence against "black-hole" agents, which fail every job at once: an agent whose
//! self-check fails says so (`unready`) and gets no work; an agent whose runs fail for reasons of
//! its own ([`QUARANTINE_AFTER`] in a row) is quarantined for a backoff that doubles while it keeps
//! failing; and a job prefers agents that have not failed it before. Agent failures per job are
//! counted here too, so that a job failing at once on every agent still uses up its attempts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use fondation_proto::{limits, model::ToAgent};
use fondation_runtime::logging::escaped;
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use crate::job_source::now_ms;

/// Agent failures in a row that quarantine an agent.
pub const QUARANTINE_AFTER: u32 = 3;
/// The first quarantine lasts this long; each further one in a row twice as long, up to
/// [`QUARANTINE_MAX`].
pub const QUARANTINE_FIRST: Duration = Duration::from_secs(30);
pub const QUARANTINE_MAX: Duration = Duration::from_secs(600);
/// Agent failures a job may meet without losing an attempt (where the job source can give one
/// back); each one after that counts an attempt, so a job that makes every analyzer fail at once
/// (a hostile repository) still ends.
pub const AGENT_FAULTS_PER_JOB: u32 = 2;

/// Messages down one agent's stream; the gateway turns them into wire messages.
pub type AgentSender = mpsc::Sender<ToAgent>;

/// What an agent said about itself in `Hello`.
#[derive(Debug, Clone)]
pub struct AgentDescription {
    pub agent_id: String,
    /// The agent process (random per start): only this process may replace the session.
    pub instance_id: String,
    pub version: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    pub peer: String,
    /// Why its self-check fails, as said in `Hello`; `None` when it takes work.
    pub unready: Option<String>,
}

/// An agent that gets no work for a while after repeated agent failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub reason: String,
    pub until: tokio::time::Instant,
}

/// An agent as `Admin/ListAgents` shows it.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    pub description: AgentDescription,
    pub running: Vec<String>,
    pub draining: bool,
    pub last_seen_ms: f64,
    /// When its session opened.
    pub connected_at_ms: f64,
    /// Why its self-check fails, when it does.
    pub unready: Option<String>,
    pub quarantine: Option<Quarantine>,
}

struct AgentEntry {
    description: AgentDescription,
    /// Identifies the live stream; a reconnect replaces the entry and its session id, so the old
    /// stream's clean-up cannot remove the new one.
    session_id: u64,
    sender: AgentSender,
    /// Assignment ids this agent is working on, as far as the coordinator knows.
    running: BTreeSet<String>,
    draining: bool,
    last_seen_ms: f64,
    /// When this session opened, for operators.
    connected_at_ms: f64,
    /// Why its self-check fails (from `Hello` and heartbeats); no work while it does.
    unready: Option<String>,
    /// For fairness: among agents with as many free slots, the one served longest ago goes first.
    last_assigned: Option<Instant>,
}

impl AgentEntry {
    fn free_slots(&self, quarantined: bool) -> u32 {
        if self.draining || self.unready.is_some() || quarantined {
            return 0;
        }
        self.description
            .slots
            .saturating_sub(self.running.len() as u32)
    }
}

/// An agent's record of agent failures. Kept by agent id, across reconnects: restarting a broken
/// agent does not lift its quarantine.
#[derive(Debug, Default)]
struct FaultRecord {
    /// Agent failures since its last run that ended otherwise.
    in_a_row: u32,
    /// Quarantines since then: the next one lasts `QUARANTINE_FIRST * 2^quarantines`.
    quarantines: u32,
    quarantine: Option<Quarantine>,
}

impl FaultRecord {
    fn quarantined(&self, now: tokio::time::Instant) -> Option<&Quarantine> {
        self.quarantine.as_ref().filter(|q| q.until > now)
    }
}

/// The agent failures one job met.
#[derive(Debug, Default)]
struct JobFaults {
    count: u32,
    /// Agents that failed it: it goes to others first.
    agents: BTreeSet<String>,
}

/// What recording an agent failure decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultVerdict {
    /// Agent failures the job has met, this one included.
    pub job_faults: u32,
    /// Whether the job may go back without losing an attempt ([`AGENT_FAULTS_PER_JOB`]).
    pub free_retry: bool,
    /// How long the agent is now quarantined, when this failure quarantined it.
    pub quarantined_for: Option<Duration>,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, AgentEntry>,
    next_session_id: u64,
    faults: HashMap<String, FaultRecord>,
    job_faults: HashMap<String, JobFaults>,
}

impl Inner {
    fn quarantined(&self, agent_id: &str, now: tokio::time::Instant) -> bool {
        self.faults
            .get(agent_id)
            .is_some_and(|record| record.quarantined(now).is_some())
    }

    fn free_slots_of(&self, entry: &AgentEntry, now: tokio::time::Instant) -> u32 {
        entry.free_slots(self.quarantined(&entry.description.agent_id, now))
    }
}

/// `QUARANTINE_FIRST * 2^(n-1)` for the n-th quarantine in a row, at most `QUARANTINE_MAX`.
pub fn quarantine_length(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(16);
    QUARANTINE_FIRST
        .saturating_mul(1 << doublings)
        .min(QUARANTINE_MAX)
}

/// Why a session was not registered.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Another agent process holds the id with a live session.
    #[error(
        "agent id {agent_id} is held by another live agent (connected from {holder_peer}); give \
         each agent its own AGENT_ID"
    )]
    HeldByAnother {
        agent_id: String,
        holder_instance: String,
        holder_peer: String,
    },
}

/// Connected agents. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct AgentRegistry {
    inner: Mutex<Inner>,
    /// Signalled when capacity may have appeared (agent joined, slot freed). A drain is never
    /// lifted: a drained agent takes work again only as a new session.
    capacity: Notify,
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new session, credited at once with the runs it re-attached (so no slot they
    /// hold is handed out meanwhile). A session of the same agent process (instance) replaces its
    /// earlier one (a reconnect over a half-open stream); one of another process is refused while
    /// the id's session is live, so a second agent with the same id can never orphan the first.
    /// Returns the new session id and the assignments the replaced session was credited with.
    pub fn connect(
        &self,
        description: AgentDescription,
        sender: AgentSender,
        adopted: BTreeSet<String>,
    ) -> Result<(u64, BTreeSet<String>), ConnectError> {
        let mut inner = self.lock();
        if let Some(holder) = inner.agents.get(&description.agent_id) {
            if holder.description.instance_id != description.instance_id {
                return Err(ConnectError::HeldByAnother {
                    agent_id: description.agent_id,
                    holder_instance: holder.description.instance_id.clone(),
                    holder_peer: holder.description.peer.clone(),
                });
            }
        }
        inner.next_session_id += 1;
        let session_id = inner.next_session_id;
        if let Some(reason) = &description.unready {
            warn!(agent_id = %description.agent_id, reason = %escaped(reason), "agent connected NOT_SERVING: its self-check fails; it gets no work");
        }
        let entry = AgentEntry {
            unready: description.unready.clone(),
            description: description.clone(),
            session_id,
            sender,
            running: adopted,
            draining: false,
            last_seen_ms: now_ms(),
            connected_at_ms: now_ms(),
            last_assigned: None,
        };
        let previous = inner.agents.insert(description.agent_id, entry);
        drop(inner);
        self.capacity.notify_one();
        Ok((session_id, previous.map(|p| p.running).unwrap_or_default()))
    }

    /// Removes a session if it is still the agent's current one; returns the assignments it ran.
    pub fn disconnect(&self, agent_id: &str, session_id: u64) -> Option<BTreeSet<String>> {
        let mut inner = self.lock();
        match inner.agents.get(agent_id) {
            Some(entry) if entry.session_id == session_id => {
                inner.agents.remove(agent_id).map(|entry| entry.running)
            }
            _ => None,
        }
    }

    pub fn touch(&self, agent_id: &str) {
        if let Some(entry) = self.lock().agents.get_mut(agent_id) {
            entry.last_seen_ms = now_ms();
        }
    }

    /// An agent's self-check verdict changed (or was repeated): `None` when it takes work.
    pub fn set_unready(&self, agent_id: &str, unready: Option<String>) {
        let mut inner = self.lock();
        let Some(entry) = inner.agents.get_mut(agent_id) else {
            return;
        };
        if entry.unready == unready {
            return;
        }
        match &unready {
            Some(reason) => {
                warn!(agent_id, reason = %escaped(reason), "agent NOT_SERVING: its self-check fails; it gets no work")
            }
            None => info!(agent_id, "agent ready: its self-check passed"),
        }
        let ready = unready.is_none();
        entry.unready = unready;
        drop(inner);
        if ready {
            self.capacity.notify_one();
        }
    }

    /// Records a run that failed for a reason of its agent: counts it against the agent (which
    /// may be quarantined) and against the job.
    pub fn record_agent_fault(&self, agent_id: &str, job_id: &str, failure: &str) -> FaultVerdict {
        let now = tokio::time::Instant::now();
        let mut inner = self.lock();
        if inner.job_faults.len() >= limits::MAX_TRACKED_JOB_FAULTS
            && !inner.job_faults.contains_key(job_id)
        {
            // Bounded memory: forgetting one only lets that job go back once more for free.
            if let Some(oldest) = inner.job_faults.keys().next().cloned() {
                inner.job_faults.remove(&oldest);
            }
        }
        let job = inner.job_faults.entry(job_id.to_string()).or_default();
        job.count += 1;
        job.agents.insert(agent_id.to_string());
        let job_faults = job.count;
        let record = inner.faults.entry(agent_id.to_string()).or_default();
        record.in_a_row += 1;
        let mut quarantined_for = None;
        // Once quarantined, every further failure in a row quarantines again, for longer.
        if record.in_a_row >= QUARANTINE_AFTER && record.quarantined(now).is_none() {
            record.quarantines += 1;
            let length = quarantine_length(record.quarantines);
            let failure = limits::truncate_utf8(failure, 512);
            let reason = format!(
                "{} agent failures in a row (the last: {failure}); no work for {} s",
                record.in_a_row,
                length.as_secs()
            );
            warn!(agent_id, reason = %escaped(&reason), "agent quarantined");
            record.quarantine = Some(Quarantine {
                reason,
                until: now + length,
            });
            quarantined_for = Some(length);
        }
        FaultVerdict {
            job_faults,
            free_retry: job_faults <= AGENT_FAULTS_PER_JOB,
            quarantined_for,
        }
    }

    /// A run of the agent ended for a reason other than the agent (success, or a failure of the
    /// job): it works, so its failures in a row start again from zero.
    pub fn record_healthy_run(&self, agent_id: &str) {
        let mut inner = self.lock();
        if let Some(record) = inner.faults.get_mut(agent_id) {
            let was_quarantined = record.quarantine.take().is_some();
            *record = FaultRecord::default();
            drop(inner);
            if was_quarantined {
                self.capacity.notify_one();
            }
        }
    }

    /// The job has ended: its agent failures need no remembering.
    pub fn forget_job(&self, job_id: &str) {
        self.lock().job_faults.remove(job_id);
    }

    /// Total free slots over all agents that take work.
    pub fn free_slots(&self) -> u32 {
        let now = tokio::time::Instant::now();
        let inner = self.lock();
        inner
            .agents
            .values()
            .map(|entry| inner.free_slots_of(entry, now))
            .sum()
    }

    /// Waits until some capacity change was signalled, or a quarantine ends.
    pub async fn capacity_changed(&self) {
        let now = tokio::time::Instant::now();
        let next_end = self
            .lock()
            .faults
            .values()
            .filter_map(|record| record.quarantined(now).map(|q| q.until))
            .min();
        match next_end {
            Some(at) => tokio::select! {
                _ = self.capacity.notified() => {}
                _ = tokio::time::sleep_until(at) => {}
            },
            None => self.capacity.notified().await,
        }
    }

    /// Picks an agent for `job_id` and credits it with `assignment_id`: agents that have not
    /// failed this job first, then the one with the most free slots, then the one served longest
    /// ago. Returns its id and sender.
    pub fn reserve_slot(&self, assignment_id: &str, job_id: &str) -> Option<(String, AgentSender)> {
        let now = tokio::time::Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let failed_it = inner.job_faults.get(job_id).map(|job| &job.agents);
        let faults = &inner.faults;
        let free = |entry: &AgentEntry| {
            let quarantined = faults
                .get(&entry.description.agent_id)
                .is_some_and(|record| record.quarantined(now).is_some());
            entry.free_slots(quarantined)
        };
        let fresh = |entry: &AgentEntry| {
            !failed_it.is_some_and(|agents| agents.contains(&entry.description.agent_id))
        };
        let entry = inner
            .agents
            .values_mut()
            .filter(|entry| free(entry) > 0)
            .max_by(|a, b| {
                fresh(a)
                    .cmp(&fresh(b))
                    .then_with(|| free(a).cmp(&free(b)))
                    // `None` (never served) sorts first among equals: reverse the time order.
                    .then_with(|| b.last_assigned.cmp(&a.last_assigned))
                    .then_with(|| b.description.agent_id.cmp(&a.description.agent_id))
            })?;
        entry.running.insert(assignment_id.to_string());
        entry.last_assigned = Some(Instant::now());
        Some((entry.description.agent_id.clone(), entry.sender.clone()))
    }

    /// Frees the slot an assignment held.
    /// Whether `agent_id` has failed `job_id` for a reason of its own before.
    pub fn has_failed(&self, agent_id: &str, job_id: &str) -> bool {
        self.lock()
            .job_faults
            .get(job_id)
            .is_some_and(|job| job.agents.contains(agent_id))
    }

    /// Like [`Self::reserve_slot`], among the agents that have not failed `job_id` only.
    pub fn reserve_fresh_slot(
        &self,
        assignment_id: &str,
        job_id: &str,
    ) -> Option<(String, AgentSender)> {
        let fresh_free = {
            let now = tokio::time::Instant::now();
            let inner = self.lock();
            let failed_it = inner.job_faults.get(job_id).map(|job| &job.agents);
            inner.agents.values().any(|entry| {
                let quarantined = inner
                    .faults
                    .get(&entry.description.agent_id)
                    .is_some_and(|record| record.quarantined(now).is_some());
                entry.free_slots(quarantined) > 0
                    && !failed_it.is_some_and(|agents| agents.contains(&entry.description.agent_id))
            })
        };
        if fresh_free {
            // reserve_slot ranks agents that have not failed the job first.
            self.reserve_slot(assignment_id, job_id)
        } else {
            None
        }
    }

    pub fn release(&self, agent_id: &str, assignment_id: &str) {
        let released = self
            .lock()
            .agents
            .get_mut(agent_id)
            .is_some_and(|entry| entry.running.remove(assignment_id));
        if released {
            self.capacity.notify_one();
        }
    }

    /// The current stream of an agent, if it is connected.
    pub fn sender(&self, agent_id: &str) -> Option<AgentSender> {
        self.lock()
            .agents
            .get(agent_id)
            .map(|entry| entry.sender.clone())
    }

    /// Marks an agent as draining; returns its sender, or None when it is not connected.
    pub fn drain(&self, agent_id: &str) -> Option<AgentSender> {
        let mut inner = self.lock();
        let entry = inner.agents.get_mut(agent_id)?;
        entry.draining = true;
        Some(entry.sender.clone())
    }

    pub fn snapshot(&self) -> Vec<AgentSnapshot> {
        let now = tokio::time::Instant::now();
        let inner = self.lock();
        let mut agents: Vec<AgentSnapshot> = inner
            .agents
            .values()
            .map(|entry| AgentSnapshot {
                description: entry.description.clone(),
                running: entry.running.iter().cloned().collect(),
                draining: entry.draining,
                last_seen_ms: entry.last_seen_ms,
                connected_at_ms: entry.connected_at_ms,
                unready: entry.unready.clone(),
                quarantine: inner
                    .faults
                    .get(&entry.description.agent_id)
                    .and_then(|record| record.quarantined(now))
                    .cloned(),
            })
            .collect();
        agents.sort_by(|a, b| a.description.agent_id.cmp(&b.description.agent_id));
        agents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description(id: &str, instance: &str, slots: u32) -> AgentDescription {
        AgentDescription {
            agent_id: id.into(),
            instance_id: instance.into(),
            version: "test".into(),
            slots,
            labels: BTreeMap::new(),
            peer: "test".into(),
            unready: None,
        }
    }

    fn agent(registry: &AgentRegistry, id: &str, slots: u32) -> mpsc::Receiver<ToAgent> {
        let (tx, rx) = mpsc::channel(8);
        registry
            .connect(description(id, "instance-1", slots), tx, BTreeSet::new())
            .expect("registered");
        rx
    }

    #[test]
    fn another_instance_is_refused_while_the_id_is_live() {
        let registry = AgentRegistry::default();
        let _first = agent(&registry, "a", 1);
        assert_eq!(
            registry
                .reserve_slot("as-1", "")
                .map(|(id, _)| id)
                .as_deref(),
            Some("a")
        );
        let (tx, _rx) = mpsc::channel(8);
        let refused = registry
            .connect(description("a", "instance-2", 4), tx, BTreeSet::new())
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("held by another live agent") && refused.contains("AGENT_ID"),
            "{refused}"
        );
        assert!(
            !refused.contains("instance-1"),
            "the holder's instance stays secret: {refused}"
        );
        // The first keeps its run and its session.
        assert_eq!(registry.snapshot()[0].running, vec!["as-1".to_string()]);
        assert_eq!(registry.snapshot()[0].description.slots, 1);
        // Once the first is gone, another process may take the id.
        assert!(registry.disconnect("a", 1).is_some());
        let (tx, _rx) = mpsc::channel(8);
        let (_, replaced) = registry
            .connect(description("a", "instance-2", 4), tx, BTreeSet::new())
            .expect("the id is free again");
        assert!(replaced.is_empty());
    }

    #[test]
    fn spreads_work_and_never_exceeds_slots() {
        let registry = AgentRegistry::default();
        let _a = agent(&registry, "a", 2);
        let _b = agent(&registry, "b", 2);
        let _c = agent(&registry, "c", 2);
        assert_eq!(registry.free_slots(), 6);
        let mut per_agent: BTreeMap<String, u32> = BTreeMap::new();
        for n in 0..6 {
            let (id, _) = registry
                .reserve_slot(&format!("as-{n}"), "job")
                .expect("a free slot");
            *per_agent.entry(id).or_default() += 1;
        }
        assert_eq!(
            per_agent.values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        assert!(registry.reserve_slot("one-too-many", "job").is_none());
        registry.release("b", "as-1");
        registry.release("b", "as-4");
        assert_eq!(registry.free_slots(), 2);
        assert_eq!(
            registry
                .reserve_slot("next", "job")
                .map(|(id, _)| id)
                .as_deref(),
            Some("b")
        );
    }

    #[test]
    fn draining_agent_gets_nothing_and_stale_disconnect_is_ignored() {
        let registry = AgentRegistry::default();
        let _first = agent(&registry, "a", 1);
        let _second = agent(&registry, "a", 1); // reconnect replaces session 1
        assert!(registry.disconnect("a", 1).is_none());
        assert_eq!(registry.free_slots(), 1);
        registry.drain("a");
        assert_eq!(registry.free_slots(), 0);
        assert!(registry.reserve_slot("x", "job").is_none());
        assert!(registry.disconnect("a", 2).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn quarantine_grows_while_the_agent_keeps_failing_and_ends_with_a_healthy_run() {
        let registry = AgentRegistry::default();
        let _a = agent(&registry, "a", 1);
        let fault = |job: &str| registry.record_agent_fault("a", job, "exit 127");
        assert_eq!(fault("j1").quarantined_for, None);
        assert_eq!(fault("j2").quarantined_for, None);
        assert_eq!(registry.free_slots(), 1, "two in a row are not enough");
        assert_eq!(fault("j3").quarantined_for, Some(QUARANTINE_FIRST));
        assert_eq!(registry.free_slots(), 0);
        assert!(registry.reserve_slot("x", "j4").is_none());
        let snapshot = &registry.snapshot()[0];
        let quarantine = snapshot.quarantine.as_ref().expect("quarantined");
        assert!(
            quarantine
                .reason
                .contains("3 agent failures in a row (the last: exit 127)"),
            "{}",
            quarantine.reason
        );

        // It ends on its own; the claim loop hears of it.
        let ended = async {
            // A wake-up left from the agent's connect may come first.
            while registry.free_slots() == 0 {
                registry.capacity_changed().await;
            }
        };
        tokio::time::timeout(QUARANTINE_FIRST * 2, ended)
            .await
            .expect("the end of the quarantine wakes capacity waiters");
        assert_eq!(registry.free_slots(), 1);

        // Still failing: each quarantine in a row lasts twice as long, up to the cap.
        let mut lengths = Vec::new();
        for n in 0..7 {
            let verdict = fault(&format!("k{n}"));
            let length = verdict
                .quarantined_for
                .expect("failing again quarantines again");
            lengths.push(length.as_secs());
            tokio::time::advance(length).await;
            assert_eq!(registry.free_slots(), 1);
        }
        assert_eq!(lengths, [60, 120, 240, 480, 600, 600, 600]);

        // A run that ends otherwise shows the agent works: it starts from zero again.
        assert_eq!(fault("m1").quarantined_for, Some(QUARANTINE_MAX));
        registry.record_healthy_run("a");
        assert_eq!(
            registry.free_slots(),
            1,
            "a healthy run lifts the quarantine"
        );
        assert_eq!(fault("m2").quarantined_for, None);
        assert_eq!(fault("m3").quarantined_for, None);
        assert_eq!(fault("m4").quarantined_for, Some(QUARANTINE_FIRST));
    }

    #[test]
    fn a_job_prefers_agents_that_have_not_failed_it_and_counts_its_faults() {
        let registry = AgentRegistry::default();
        let _a = agent(&registry, "a", 4);
        let _b = agent(&registry, "b", 1);
        let first = registry.record_agent_fault("a", "job", "exit 127");
        assert_eq!((first.job_faults, first.free_retry), (1, true));
        // "a" has more free slots, but failed this job: "b" goes first.
        assert_eq!(
            registry
                .reserve_slot("as-1", "job")
                .map(|(id, _)| id)
                .as_deref(),
            Some("b")
        );
        // Only "a" is left: it still gets the job (a preference, not a ban).
        assert_eq!(
            registry
                .reserve_slot("as-2", "job")
                .map(|(id, _)| id)
                .as_deref(),
            Some("a")
        );
        let second = registry.record_agent_fault("b", "job", "exit 127");
        assert_eq!((second.job_faults, second.free_retry), (2, true));
        let third = registry.record_agent_fault("a", "job", "exit 127");
        assert_eq!(
            (third.job_faults, third.free_retry),
            (3, false),
            "past AGENT_FAULTS_PER_JOB every agent failure counts an attempt"
        );
        registry.forget_job("job");
        assert!(registry.record_agent_fault("b", "job", "x").free_retry);
    }

    #[test]
    fn an_unready_agent_gets_no_work_until_it_says_it_is_ready() {
        let registry = AgentRegistry::default();
        let _a = agent(&registry, "a", 2);
        registry.set_unready("a", Some("ANALYZER_WORKDIR /app/cli is missing".into()));
        assert_eq!(registry.free_slots(), 0);
        assert!(registry.reserve_slot("x", "job").is_none());
        assert_eq!(
            registry.snapshot()[0].unready.as_deref(),
            Some("ANALYZER_WORKDIR /app/cli is missing")
        );
        registry.set_unready("a", None);
        assert_eq!(registry.free_slots(), 2);
        assert_eq!(registry.snapshot()[0].unready, None);
    }
}
