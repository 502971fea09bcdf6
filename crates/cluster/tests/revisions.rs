//! Revisions: a `PutRevised` gets the next revision of the member's counter, stored with the
//! data it stamped, so that a reopened machine and one that installed a snapshot go on from
//! it; a proposal whose revision does not fit, or that writes the counter, is refused.

mod common;

use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;
use timber_cluster::{Proposal, FIRST_REVISION, REVISION_KEY};
use timber_kv::Db;

use common::{entry, open_machine as open};

fn revision_in(db: &Db, key: &[u8]) -> u64 {
    let v = db.get(key).unwrap().unwrap();
    u64::from_le_bytes(v[1..9].try_into().unwrap())
}

fn revised(key: &str) -> Proposal {
    let mut p = Proposal::default();
    p.put_revised(key.as_bytes().to_vec(), b"x\0\0\0\0\0\0\0\0data".to_vec(), 1);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_count_from_the_stored_counter_across_restarts_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = {
        let (mut m, db) = open(dir.path());
        let mut two = revised("b");
        two.put(b"plain".to_vec(), b"p".to_vec());
        two.put_revised(b"c".to_vec(), b"y\0\0\0\0\0\0\0\0".to_vec(), 1);
        m.apply(vec![entry(1, revised("a")), entry(2, two)]).await.unwrap();
        assert_eq!(revision_in(&db, b"a"), FIRST_REVISION);
        assert_eq!(revision_in(&db, b"b"), FIRST_REVISION + 1);
        assert_eq!(revision_in(&db, b"c"), FIRST_REVISION + 2);
        assert_eq!(&db.get(b"b").unwrap().unwrap()[9..], b"data", "only the slot is stamped");
        assert_eq!(db.get(b"plain").unwrap().unwrap().as_ref(), b"p");
        m.get_snapshot_builder().await.build_snapshot().await.unwrap()
    };
    // Reopened: the counter was stored with the data.
    let (mut m, db) = open(dir.path());
    m.apply(vec![entry(3, revised("a"))]).await.unwrap();
    assert_eq!(revision_in(&db, b"a"), FIRST_REVISION + 3);

    // A member that installs the snapshot goes on from the snapshot's counter.
    let other = tempfile::tempdir().unwrap();
    let (mut m, db) = open(other.path());
    m.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert_eq!(revision_in(&db, b"c"), FIRST_REVISION + 2);
    m.apply(vec![entry(3, revised("d"))]).await.unwrap();
    assert_eq!(revision_in(&db, b"d"), FIRST_REVISION + 3);
}

#[test]
fn a_revision_that_does_not_fit_or_a_write_of_the_counter_is_refused() {
    let mut p = Proposal::default();
    p.put_revised(b"k".to_vec(), vec![0; 8], 1);
    assert!(p.check().is_err());
    let mut p = Proposal::default();
    p.put_revised(b"k".to_vec(), vec![0; 9], 1);
    assert!(p.check().is_ok());
    let mut p = Proposal::default();
    p.put(REVISION_KEY.to_vec(), vec![9; 8]);
    assert!(p.check().is_err());
}
