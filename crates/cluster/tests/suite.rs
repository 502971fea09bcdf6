//! openraft's storage test suite against `LogStore`, with a small in-memory state machine (the
//! suite tests the two together), and the log store's own behaviour across reopens.

mod common;

use common::{Config, Set, Sm};
use openraft::storage::RaftLogStorage;
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, RaftLogReader, StorageError, Vote};
use timber_cluster::LogStore;
use timber_wal::SyncMode;

struct Builder(SyncMode);

impl StoreBuilder<Config, LogStore<Config>, Sm, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore<Config>, Sm), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path(), self.0).unwrap();
        Ok((dir, log, Sm::default()))
    }
}

#[test]
fn openraft_storage_suite_passes_with_fsync_per_append() {
    Suite::test_all(Builder(SyncMode::Always)).unwrap();
}

#[test]
fn openraft_storage_suite_passes_with_interval_sync() {
    Suite::test_all(Builder(SyncMode::Interval(std::time::Duration::from_millis(5)))).unwrap();
}

fn normal(term: u64, index: u64, key: &str) -> Entry<Config> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(Set { key: key.into(), value: format!("v{index}") }),
    }
}

async fn append(log: &mut LogStore<Config>, entries: Vec<Entry<Config>>) {
    // `blocking_append` builds the flush callback and waits for it.
    openraft::storage::RaftLogStorageExt::blocking_append(log, entries).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_entries_and_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        append(&mut log, (0..10).map(|i| normal(3, i, "k")).collect()).await;
        log.truncate(log_id(3, 1, 8)).await.unwrap();
        append(&mut log, (8..12).map(|i| normal(4, i, "k")).collect()).await;
        log.purge(log_id(3, 1, 4)).await.unwrap();
    }
    let mut log = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 1, 4)));
    assert_eq!(state.last_log_id, Some(log_id(4, 1, 11)));
    let got = log.try_get_log_entries(0..100).await.unwrap();
    let ids: Vec<_> = got.iter().map(|e| e.log_id).collect();
    let want: Vec<_> =
        (5..8).map(|i| log_id(3, 1, i)).chain((8..12).map(|i| log_id(4, 1, i))).collect();
    assert_eq!(ids, want);
    assert_eq!(got[0], normal(3, 5, "k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_past_the_end_then_append_continues_after_it() {
    // A follower that installed a snapshot purges past its last entry; the leader's next entry
    // follows the snapshot.
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap();
    append(&mut log, (0..3).map(|i| normal(1, i, "a")).collect()).await;
    log.purge(log_id(2, 1, 50)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        (state.last_purged_log_id, state.last_log_id),
        (Some(log_id(2, 1, 50)), Some(log_id(2, 1, 50)))
    );
    append(&mut log, vec![normal(2, 51, "b")]).await;
    drop(log);
    let mut log = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap();
    let got = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(got, vec![normal(2, 51, "b")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_is_refused_and_leaves_the_log_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap();
    append(&mut log, (0..3).map(|i| normal(1, i, "a")).collect()).await;
    let r =
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, vec![normal(1, 5, "x")])
            .await;
    assert!(r.is_err());
    assert_eq!(log.try_get_log_entries(..).await.unwrap().len(), 3);
}

#[test]
fn damaged_state_file_is_reported_not_taken_for_a_fresh_node() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut log = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap();
        log.save_vote(&Vote::new(5, 2)).await.unwrap();
    });
    let path = dir.path().join("raft.state");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = LogStore::<Config>::open(dir.path(), SyncMode::Always).unwrap_err();
    assert!(matches!(err, timber_cluster::Error::Corrupt { .. }), "{err}");
}
