//! openraft's storage suite against `LogStore` with `KvMachine`, the state machine members run.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use timber_cluster::{KvMachine, LogStore, TypeConfig};
use timber_kv::Db;
use timber_wal::SyncMode;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, KvMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore<TypeConfig>, KvMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path().join("log"), SyncMode::Always).unwrap();
        let db = Arc::new(Db::open(dir.path().join("db"), timber_kv::Options::default()).unwrap());
        let machine = KvMachine::open(db, None, dir.path().join("machine")).unwrap();
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_storage_suite_passes_with_the_kv_machine() {
    Suite::test_all(Builder).unwrap();
}
