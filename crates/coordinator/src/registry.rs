//! The worker registry: who joined, which clients they host, and when they were last heard.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fedcompress_core::ClientId;

pub type WorkerId = u64;

#[derive(Debug)]
pub struct WorkerEntry {
    pub name: String,
    pub session: String,
    /// Client id to sample count.
    pub clients: BTreeMap<ClientId, u64>,
    pub last_seen: Mutex<Instant>,
}

impl WorkerEntry {
    pub fn touch(&self) {
        *self
            .last_seen
            .lock()
            .expect("last_seen lock is never poisoned") = Instant::now();
    }

    pub fn silent_for(&self) -> Duration {
        self.last_seen
            .lock()
            .expect("last_seen lock is never poisoned")
            .elapsed()
    }
}

/// Workers by id, with indexes by name and by client.
#[derive(Debug, Default)]
pub struct Registry {
    pub workers: DashMap<WorkerId, WorkerEntry>,
    by_name: DashMap<String, WorkerId>,
    /// Client id to (worker, sample count).
    clients: DashMap<ClientId, (WorkerId, u64)>,
    next_id: Mutex<WorkerId>,
}

/// Reason a join was rejected.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("client {client} is already hosted by worker `{other}`")]
    ClientTaken { client: ClientId, other: String },
    #[error("worker `{0}` hosts no clients")]
    NoClients(String),
}

impl Registry {
    /// Registers a worker, or replaces the entry of a worker that joins again under the same
    /// name (a restart). Returns the worker id, which stays the same across restarts.
    pub fn join(
        &self,
        name: &str,
        session: String,
        clients: BTreeMap<ClientId, u64>,
    ) -> Result<WorkerId, JoinError> {
        if clients.is_empty() {
            return Err(JoinError::NoClients(name.to_string()));
        }
        let existing = self.by_name.get(name).map(|id| *id);
        for &client in clients.keys() {
            if let Some(owner) = self.clients.get(&client)
                && Some(owner.0) != existing
            {
                let other = self
                    .workers
                    .get(&owner.0)
                    .map(|w| w.name.clone())
                    .unwrap_or_default();
                return Err(JoinError::ClientTaken { client, other });
            }
        }

        let id = existing.unwrap_or_else(|| {
            let mut next = self.next_id.lock().expect("id lock is never poisoned");
            *next += 1;
            *next
        });
        if let Some((_, old)) = self.workers.remove(&id) {
            for client in old.clients.keys() {
                self.clients.remove(client);
            }
        }
        for (&client, &samples) in &clients {
            self.clients.insert(client, (id, samples));
        }
        self.workers.insert(
            id,
            WorkerEntry {
                name: name.to_string(),
                session,
                clients,
                last_seen: Mutex::new(Instant::now()),
            },
        );
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    /// Removes a worker and its clients.
    pub fn leave(&self, id: WorkerId) {
        if let Some((_, entry)) = self.workers.remove(&id) {
            self.by_name.remove(&entry.name);
            for client in entry.clients.keys() {
                self.clients.remove(client);
            }
        }
    }

    /// Checks the session of a worker and marks it as heard from.
    pub fn authenticate(&self, id: WorkerId, session: &str) -> bool {
        match self.workers.get(&id) {
            Some(entry) if entry.session == session => {
                entry.touch();
                true
            }
            _ => false,
        }
    }

    pub fn client(&self, client: ClientId) -> Option<(WorkerId, u64)> {
        self.clients.get(&client).map(|entry| *entry)
    }

    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// Clients whose workers were heard from within `timeout`, ascending.
    pub fn live_clients(&self, timeout: Duration) -> Vec<ClientId> {
        let mut clients: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|entry| self.is_alive(entry.value().0, timeout))
            .map(|entry| *entry.key())
            .collect();
        clients.sort_unstable();
        clients
    }

    pub fn is_alive(&self, id: WorkerId, timeout: Duration) -> bool {
        self.workers
            .get(&id)
            .is_some_and(|entry| entry.silent_for() <= timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_rejoin_keeps_id() {
        let registry = Registry::default();
        let first = registry
            .join("w0", "s1".into(), BTreeMap::from([(0, 10), (1, 20)]))
            .unwrap();
        let again = registry
            .join("w0", "s2".into(), BTreeMap::from([(0, 10), (1, 20)]))
            .unwrap();
        assert_eq!(first, again);
        assert!(!registry.authenticate(first, "s1"));
        assert!(registry.authenticate(first, "s2"));
        assert_eq!(registry.num_clients(), 2);
    }

    #[test]
    fn registry_rejects_taken_client() {
        let registry = Registry::default();
        registry
            .join("w0", "a".into(), BTreeMap::from([(0, 10)]))
            .unwrap();
        let error = registry
            .join("w1", "b".into(), BTreeMap::from([(0, 10)]))
            .unwrap_err();
        assert!(matches!(error, JoinError::ClientTaken { client: 0, .. }));
        // A client without samples may join; a round of only such clients is skipped.
        assert!(
            registry
                .join("w2", "c".into(), BTreeMap::from([(5, 0)]))
                .is_ok()
        );
        assert!(registry.join("w3", "d".into(), BTreeMap::new()).is_err());
    }

    #[test]
    fn registry_leave_frees_clients() {
        let registry = Registry::default();
        let id = registry
            .join("w0", "a".into(), BTreeMap::from([(3, 1)]))
            .unwrap();
        registry.leave(id);
        assert_eq!(registry.num_clients(), 0);
        assert!(
            registry
                .join("w1", "b".into(), BTreeMap::from([(3, 1)]))
                .is_ok()
        );
    }
}
