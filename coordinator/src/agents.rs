//! The registry of connected agents: their slots, what they run, and how to reach them.
//!
//! Slot accounting lives here so that the claim loop only claims while some agent can take the
//! job, and so that no agent is ever handed more assignments than it announced slots.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::Instant,
};

use fondation_proto::model::ToAgent;
use tokio::sync::{mpsc, Notify};

use crate::job_source::now_ms;

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
}

/// An agent as `Admin/ListAgents` shows it.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    pub description: AgentDescription,
    pub running: Vec<String>,
    pub draining: bool,
    pub last_seen_ms: f64,
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
    /// For fairness: among agents with as many free slots, the one served longest ago goes first.
    last_assigned: Option<Instant>,
}

impl AgentEntry {
    fn free_slots(&self) -> u32 {
        if self.draining {
            return 0;
        }
        self.description
            .slots
            .saturating_sub(self.running.len() as u32)
    }
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, AgentEntry>,
    next_session_id: u64,
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
        let entry = AgentEntry {
            description: description.clone(),
            session_id,
            sender,
            running: adopted,
            draining: false,
            last_seen_ms: now_ms(),
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

    /// Total free slots over all agents that take work.
    pub fn free_slots(&self) -> u32 {
        self.lock()
            .agents
            .values()
            .map(AgentEntry::free_slots)
            .sum()
    }

    /// Waits until some capacity change was signalled.
    pub async fn capacity_changed(&self) {
        self.capacity.notified().await
    }

    /// Picks the agent with the most free slots (least recently served on a tie), credits it with
    /// `assignment_id` and returns its id and sender.
    pub fn reserve_slot(&self, assignment_id: &str) -> Option<(String, AgentSender)> {
        let mut inner = self.lock();
        let entry = inner
            .agents
            .values_mut()
            .filter(|entry| entry.free_slots() > 0)
            .max_by(|a, b| {
                a.free_slots()
                    .cmp(&b.free_slots())
                    // `None` (never served) sorts first among equals: reverse the time order.
                    .then_with(|| b.last_assigned.cmp(&a.last_assigned))
                    .then_with(|| b.description.agent_id.cmp(&a.description.agent_id))
            })?;
        entry.running.insert(assignment_id.to_string());
        entry.last_assigned = Some(Instant::now());
        Some((entry.description.agent_id.clone(), entry.sender.clone()))
    }

    /// Frees the slot an assignment held.
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
        let mut agents: Vec<AgentSnapshot> = self
            .lock()
            .agents
            .values()
            .map(|entry| AgentSnapshot {
                description: entry.description.clone(),
                running: entry.running.iter().cloned().collect(),
                draining: entry.draining,
                last_seen_ms: entry.last_seen_ms,
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
            registry.reserve_slot("as-1").map(|(id, _)| id).as_deref(),
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
                .reserve_slot(&format!("as-{n}"))
                .expect("a free slot");
            *per_agent.entry(id).or_default() += 1;
        }
        assert_eq!(
            per_agent.values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        assert!(registry.reserve_slot("one-too-many").is_none());
        registry.release("b", "as-1");
        registry.release("b", "as-4");
        assert_eq!(registry.free_slots(), 2);
        assert_eq!(
            registry.reserve_slot("next").map(|(id, _)| id).as_deref(),
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
        assert!(registry.reserve_slot("x").is_none());
        assert!(registry.disconnect("a", 2).is_some());
    }
}
