//! The coordinator's one SQLite database in `DATA_DIR`, and its one owner.
//!
//! The journal and the embedded store keep their tables in this one file, whichever job source
//! runs, so that one transaction can cover a claim and its journal entry. A [`Database`] is a
//! handle to a dedicated thread that owns the only connection: requests arrive over a channel,
//! and the requests that are waiting when the thread gets to them share one transaction and one
//! fsync (group commit). Each request runs inside a savepoint of its own, so a request that fails
//! rolls back only what it did, never its neighbours in the batch; each caller is answered only
//! after the commit that holds its changes (`synchronous = FULL`: the commit is on disk). The
//! thread replaces a `spawn_blocking` hop per statement and the busy waits of two connections on
//! the same WAL lock.
//!
//! The file was called `jobs.sqlite3` when only the embedded store used it; a coordinator started
//! on such a `DATA_DIR` renames it (with its `-wal` and `-shm` companions) before opening it.

use std::{
    future::Future,
    io,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use rusqlite::Connection;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// Most requests one transaction takes; more wait for the next commit, so one huge burst cannot
/// hold every caller's answer behind a single long transaction.
const MAX_BATCH: usize = 256;

/// Prepared statements kept per connection: every fixed statement of the store and the journal.
const STATEMENT_CACHE: usize = 64;

/// How long the connection waits for another process holding the file (a second coordinator on
/// the same `DATA_DIR` by mistake, an operator's `sqlite3`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("renaming the legacy database file in {dir}: {source}")]
    Rename { dir: String, source: io::Error },
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("starting the database thread: {0}")]
    Thread(io::Error),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the commit failed, nothing of this request was kept: {0}")]
    Commit(String),
    #[error(
        "the database dropped the request (its thread stopped, the request panicked or no \
         transaction could start); nothing of it was kept"
    )]
    Closed,
    #[error("{0}")]
    Unusable(String),
}

/// What the thread does with a request: run it on the connection inside its savepoint, and say
/// whether it succeeded (kept) or not (rolled back), with the answer to send after the commit.
type Request = Box<dyn FnOnce(&Connection) -> Ran + Send>;

/// Sends a caller its answer, given the batch commit's error if the commit failed.
type Answer = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

struct Ran {
    ok: bool,
    answer: Answer,
}

/// Handle to the database thread; cheap to clone. The thread ends, and the connection closes,
/// when the last handle is dropped (that drop waits for it, so a reopen sees a closed file).
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    commits: Arc<AtomicU64>,
    path: PathBuf,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Opens (creating if needed) the database in `data_dir`, runs `setup` on the connection (the
    /// schema of each user of the file) and starts its thread.
    pub fn open(data_dir: &Path) -> Result<Self, DatabaseError> {
        std::fs::create_dir_all(data_dir).map_err(|source| DatabaseError::Rename {
            dir: data_dir.display().to_string(),
            source,
        })?;
        let path = path(data_dir).map_err(|source| DatabaseError::Rename {
            dir: data_dir.display().to_string(),
            source,
        })?;
        let open_error = |source| DatabaseError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_error)?;
        configure(&conn)?;
        crate::journal::create_tables(&mut conn)?;
        crate::job_source::embedded_store::create_tables(&mut conn)?;
        crate::job_logs::create_tables(&mut conn)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

        let (requests, receiver) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let thread_commits = Arc::clone(&commits);
        let thread = std::thread::Builder::new()
            .name("database".to_owned())
            .spawn(move || serve(conn, receiver, &thread_commits))
            .map_err(DatabaseError::Thread)?;
        Ok(Database {
            inner: Arc::new(Inner {
                requests: Mutex::new(Some(requests)),
                thread: Mutex::new(Some(thread)),
                commits,
                path,
            }),
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Transactions committed with at least one change, since the database was opened: the
    /// fsyncs (of the WAL) the coordinator paid for.
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::SeqCst)
    }

    /// Runs `op` on the connection, in its own savepoint of the current batch's transaction, and
    /// resolves once that transaction is committed: `Ok` only when `op` succeeded and its changes
    /// are on disk. An `Err` from `op` rolls back what it did, and only that.
    ///
    /// The request is queued before this returns (not when the future is first polled), so
    /// requests made one after the other are run in that order.
    pub fn run<T, E, F>(&self, op: F) -> impl Future<Output = Result<T, E>> + Send + 'static
    where
        T: Send + 'static,
        E: From<DatabaseError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, E>>();
        let request: Request = Box::new(move |conn| {
            let result = op(conn);
            Ran {
                ok: result.is_ok(),
                answer: Box::new(move |commit_error| {
                    let result = match (result, commit_error) {
                        (Ok(_), Some(error)) => {
                            Err(DatabaseError::Commit(error.to_string()).into())
                        }
                        (result, _) => result,
                    };
                    // The caller may have given up waiting; its change stands either way.
                    let _ = reply.send(result);
                }),
            }
        });
        let sent = self
            .inner
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map(|requests| requests.send(request).is_ok())
            .unwrap_or(false);
        async move {
            if !sent {
                return Err(DatabaseError::Closed.into());
            }
            answered(answer)
                .await
                .unwrap_or_else(|| Err(DatabaseError::Closed.into()))
        }
    }
}

/// Waits for the thread's answer; `None` when the request was dropped.
#[cfg(not(test))]
async fn answered<T: Send + 'static>(answer: oneshot::Receiver<T>) -> Option<T> {
    answer.await.ok()
}

/// The unit tests with a paused clock (`start_paused`) must not see time jump while the database
/// thread works: tokio advances a paused clock whenever the runtime looks idle, which a plain
/// thread does not prevent but a blocking task does.
#[cfg(test)]
async fn answered<T: Send + 'static>(answer: oneshot::Receiver<T>) -> Option<T> {
    tokio::task::spawn_blocking(move || answer.blocking_recv().ok())
        .await
        .ok()
        .flatten()
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has answered what is queued.
        drop(
            self.requests
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take(),
        );
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                error!("the database thread panicked");
            }
        }
    }
}

fn configure(conn: &Connection) -> Result<(), DatabaseError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL lets the file be read (an operator, a backup) during a write; FULL syncs the WAL on
    // every commit, which is what makes an acknowledged change durable.
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DatabaseError::Unusable(format!(
            "journal_mode is {mode}, not wal"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// The thread: takes what is queued (up to [`MAX_BATCH`]), runs it in one transaction, commits,
/// answers, and starts over; returns when every handle is gone.
fn serve(conn: Connection, requests: mpsc::Receiver<Request>, commits: &AtomicU64) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = requests.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch.drain(..), commits);
    }
}

fn run_batch(conn: &Connection, batch: impl Iterator<Item = Request>, commits: &AtomicU64) {
    let changes_before = conn.total_changes();
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        // Nothing ran: every caller hears why.
        warn!(%error, "the database could not start a transaction");
        for request in batch {
            drop(request);
        }
        return;
    }
    let mut answers = Vec::new();
    for request in batch {
        if let Some(answer) = run_one(conn, request) {
            answers.push(answer);
        }
    }
    let wrote = conn.total_changes() != changes_before;
    if wrote && answers.len() > 1 {
        crate::failpoint::hit("mid-group-commit");
    }
    let commit = conn.execute_batch("COMMIT");
    if let Err(error) = &commit {
        warn!(%error, requests = answers.len(), "the database commit failed; the batch is lost");
        if let Err(error) = conn.execute_batch("ROLLBACK") {
            warn!(%error, "rolling back the failed commit failed");
        }
    } else if wrote {
        commits.fetch_add(1, Ordering::SeqCst);
    }
    for answer in answers {
        answer(commit.as_ref().err());
    }
}

/// Runs one request in its savepoint; `None` when it panicked (its caller hears `Closed`).
fn run_one(conn: &Connection, request: Request) -> Option<Answer> {
    if let Err(error) = conn.execute_batch("SAVEPOINT request") {
        warn!(%error, "the database could not open a savepoint; the request is refused");
        return None;
    }
    let ran = catch_unwind(AssertUnwindSafe(|| request(conn)));
    let keep = matches!(&ran, Ok(ran) if ran.ok);
    let end = if keep {
        conn.execute_batch("RELEASE request")
    } else {
        conn.execute_batch("ROLLBACK TO request; RELEASE request")
    };
    if let Err(error) = end {
        // The savepoint could not be closed; what the request did cannot be told apart from
        // what its neighbours did, so it would be wrong to answer it as either.
        error!(%error, "the database could not close a savepoint");
    }
    match ran {
        Ok(ran) => Some(ran.answer),
        Err(_) => {
            error!("a database request panicked; it was rolled back");
            None
        }
    }
}

/// File name of the database inside `DATA_DIR`.
pub const DATABASE_FILE: &str = "coordinator.sqlite3";

/// The name earlier versions used.
const LEGACY_DATABASE_FILE: &str = "jobs.sqlite3";

/// SQLite's companion files of a database in WAL mode: `<name>-wal` holds committed
/// transactions not yet copied into the main file, so it must move with it.
const COMPANION_SUFFIXES: [&str; 2] = ["-wal", "-shm"];

/// The database's path in `data_dir`, after renaming a legacy `jobs.sqlite3` (and its companions)
/// when no `coordinator.sqlite3` exists yet. Cheap and idempotent: every opener calls it.
pub fn path(data_dir: &Path) -> io::Result<PathBuf> {
    let path = data_dir.join(DATABASE_FILE);
    let legacy = data_dir.join(LEGACY_DATABASE_FILE);
    if exists(&path)? {
        if exists(&legacy)? {
            warn!(
                kept = %path.display(),
                ignored = %legacy.display(),
                "both database files exist; the legacy one is ignored, remove it once checked"
            );
        }
        return Ok(path);
    }
    if !exists(&legacy)? {
        return Ok(path);
    }
    // Companions first, the main file last: until the main file has its new name, a restart
    // after a crash here runs the migration again and moves what is left.
    for suffix in COMPANION_SUFFIXES {
        let from = with_suffix(&legacy, suffix);
        if exists(&from)? {
            std::fs::rename(&from, with_suffix(&path, suffix))?;
        }
    }
    std::fs::rename(&legacy, &path)?;
    // The renames are durable once the folder is synced.
    std::fs::File::open(data_dir)?.sync_all()?;
    info!(
        from = %legacy.display(),
        to = %path.display(),
        "database file renamed to its new name"
    );
    Ok(path)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Whether `path` exists, not following a symlink; other errors than "not found" are errors.
fn exists(path: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(path: &Path, table_sql: &str) -> i64 {
        // A second connection sees only what is committed.
        let conn = Connection::open(path).expect("second connection");
        conn.query_row(table_sql, [], |row| row.get(0))
            .expect("count")
    }

    fn insert_probe(
        db: &Database,
        id: &'static str,
        fail: bool,
    ) -> impl Future<Output = Result<(), DatabaseError>> {
        db.run(move |conn| {
            conn.execute(
                "INSERT INTO journal_assignments (assignment_id, job_id, epoch, attempt, agent_id)
                 VALUES (?1, 'job', 1, 1, 'agent')",
                [id],
            )?;
            if fail {
                return Err(DatabaseError::Unusable("refused after writing".into()));
            }
            Ok(())
        })
    }

    #[tokio::test]
    async fn runs_in_wal_with_full_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::open(dir.path()).expect("open");
        let (mode, synchronous): (String, i64) = db
            .run(|conn| {
                let mode = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                let sync = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                Ok::<_, DatabaseError>((mode, sync))
            })
            .await
            .expect("pragmas");
        assert_eq!((mode.as_str(), synchronous), ("wal", 2), "2 is FULL");
        assert_eq!(db.commits(), 0, "reads commit nothing");
    }

    /// Requests queued while the thread is busy share one commit; each is answered only after it,
    /// and the one that fails rolls back only its own insert.
    #[tokio::test]
    async fn a_batch_shares_one_commit_and_a_failure_rolls_back_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::open(dir.path()).expect("open");
        let path = db.path().to_owned();
        // Hold the thread until every other request is queued behind it.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let blocker = db.run(move |_conn| {
            let _ = started_tx.send(());
            wait.recv_timeout(Duration::from_secs(30))
                .map_err(|_| DatabaseError::Unusable("the test never released the thread".into()))
        });
        started.await.expect("the thread runs the blocker");
        let kept_a = insert_probe(&db, "a", false);
        let failed = insert_probe(&db, "b", true);
        let kept_c = insert_probe(&db, "c", false);
        release.send(()).expect("release");
        blocker.await.expect("blocker");

        kept_a.await.expect("a committed");
        // Answered after its batch's commit: visible to another connection now.
        assert_eq!(
            count(
                &path,
                "SELECT COUNT(*) FROM journal_assignments WHERE assignment_id = 'a'"
            ),
            1
        );
        match failed.await {
            Err(DatabaseError::Unusable(_)) => {}
            other => panic!("the failing request must report its own error, got {other:?}"),
        }
        kept_c.await.expect("c committed");
        assert_eq!(
            count(
                &path,
                "SELECT COUNT(*) FROM journal_assignments WHERE assignment_id IN ('a', 'b', 'c')"
            ),
            2,
            "a and c kept, b rolled back"
        );
        assert_eq!(db.commits(), 1, "the three requests shared one commit");
    }

    /// No answer before the commit: every acknowledged write is already visible to a second
    /// connection, and many concurrent writes take far fewer commits than writes.
    #[tokio::test]
    async fn concurrent_writes_are_acknowledged_after_their_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::open(dir.path()).expect("open");
        let path = db.path().to_owned();
        const WRITES: usize = 200;
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..WRITES {
            let db = db.clone();
            let path = path.clone();
            tasks.spawn(async move {
                let id = format!("w{n}");
                let probe = id.clone();
                db.run(move |conn| {
                    conn.execute(
                        "INSERT INTO journal_assignments
                         (assignment_id, job_id, epoch, attempt, agent_id)
                         VALUES (?1, 'job', 1, 1, 'agent')",
                        [&id],
                    )?;
                    Ok::<_, DatabaseError>(())
                })
                .await
                .expect("write");
                let seen = Connection::open(&path)
                    .expect("second connection")
                    .query_row(
                        "SELECT COUNT(*) FROM journal_assignments WHERE assignment_id = ?1",
                        [&probe],
                        |row| row.get::<_, i64>(0),
                    )
                    .expect("count");
                assert_eq!(seen, 1, "{probe} acknowledged before its commit");
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("writer task");
        }
        let commits = db.commits();
        assert!(
            commits >= 1 && commits <= WRITES as u64,
            "{commits} commits"
        );
    }

    #[tokio::test]
    async fn a_panicking_request_is_rolled_back_and_the_thread_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::open(dir.path()).expect("open");
        let panicked = db.run(|conn| {
            conn.execute(
                "INSERT INTO journal_assignments (assignment_id, job_id, epoch, attempt, agent_id)
                 VALUES ('p', 'job', 1, 1, 'agent')",
                [],
            )?;
            if conn.is_autocommit() {
                return Ok(());
            }
            panic!("a bug in a request");
        });
        assert!(matches!(panicked.await, Err(DatabaseError::Closed)));
        insert_probe(&db, "after", false)
            .await
            .expect("the thread still serves");
        assert_eq!(
            count(db.path(), "SELECT COUNT(*) FROM journal_assignments"),
            1,
            "only the later insert is kept"
        );
    }

    fn write(dir: &Path, name: &str, content: &str) {
        std::fs::write(dir.join(name), content).expect("write");
    }

    fn read(dir: &Path, name: &str) -> Option<String> {
        std::fs::read_to_string(dir.join(name)).ok()
    }

    #[test]
    fn legacy_file_and_companions_are_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "jobs.sqlite3", "main");
        write(dir.path(), "jobs.sqlite3-wal", "wal");
        write(dir.path(), "jobs.sqlite3-shm", "shm");

        let path = super::path(dir.path()).expect("migrate");
        assert_eq!(path, dir.path().join("coordinator.sqlite3"));
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("main")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3-wal").as_deref(),
            Some("wal")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3-shm").as_deref(),
            Some("shm")
        );
        for old in ["jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"] {
            assert_eq!(read(dir.path(), old), None, "{old} is gone");
        }
        // A second start finds nothing to do.
        assert_eq!(super::path(dir.path()).expect("again"), path);
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("main")
        );
    }

    #[test]
    fn an_existing_new_file_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "coordinator.sqlite3", "new");
        write(dir.path(), "jobs.sqlite3", "old");
        write(dir.path(), "jobs.sqlite3-wal", "old wal");

        super::path(dir.path()).expect("path");
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("new")
        );
        assert_eq!(read(dir.path(), "coordinator.sqlite3-wal"), None);
        assert_eq!(read(dir.path(), "jobs.sqlite3").as_deref(), Some("old"));
        assert_eq!(
            read(dir.path(), "jobs.sqlite3-wal").as_deref(),
            Some("old wal")
        );
    }

    #[test]
    fn a_migration_cut_short_after_the_companions_completes_on_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "jobs.sqlite3", "main");
        write(dir.path(), "coordinator.sqlite3-wal", "wal");

        super::path(dir.path()).expect("migrate");
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("main")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3-wal").as_deref(),
            Some("wal")
        );
        assert_eq!(read(dir.path(), "jobs.sqlite3"), None);
    }

    #[test]
    fn an_empty_data_dir_gets_the_new_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            super::path(dir.path()).expect("path"),
            dir.path().join("coordinator.sqlite3")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3"),
            None,
            "nothing created"
        );
    }
}
