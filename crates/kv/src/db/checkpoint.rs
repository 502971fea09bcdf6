//! Checkpoints: a consistent copy of the database in another directory. Tables are hard-linked
//! (copied across file systems), the live WAL is copied into a new log, and a new manifest names
//! them. The WAL is pinned meanwhile, so that no flush truncates records the copy still needs.

use std::fs;
use std::path::Path;

use timber_wal::{SyncMode, Wal};

use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::table;
use crate::view::View;

use super::inner::{release, Inner};
use super::open::wal_options;

impl Inner {
    pub(super) fn checkpoint(&self, dst: &Path) -> Result<u64> {
        if dst.exists() {
            return Err(Error::InvalidParam(format!(
                "checkpoint target {} already exists",
                dst.display()
            )));
        }
        // Everything at or below `seq` is in `view`'s tables or in WAL records below `wal_end`,
        // and nothing above it is: taken together under the writer lock.
        let (seq, wal_end, view) = {
            let w = self.write.lock();
            self.check_writable()?;
            (w.last_seq, self.wal.next_seq(), self.view.load_full())
        };
        let log_number = view.version.log_number;
        *self.wal_pins.lock().entry(log_number).or_default() += 1;
        let r = self.write_checkpoint(dst, &view, seq, log_number, wal_end);
        release(&mut self.wal_pins.lock(), log_number);
        if r.is_err() {
            let _ = fs::remove_dir_all(dst);
        }
        r.map(|()| seq)
    }

    fn write_checkpoint(
        &self,
        dst: &Path,
        view: &View,
        seq: u64,
        log_number: u64,
        wal_end: u64,
    ) -> Result<()> {
        fs::create_dir_all(dst).map_err(|e| Error::io("create", dst, e))?;
        for t in view.version.tables() {
            let to = dst.join(table::file_name(t.meta.id));
            if fs::hard_link(t.path(), &to).is_err() {
                fs::copy(t.path(), &to).map_err(|e| Error::io("copy", t.path(), e))?;
                fs::File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io("fsync", &to, e))?;
            }
        }
        let wal_opts = wal_options(&self.opts)
            .sync(SyncMode::Manual)
            .name(format!("{}-checkpoint", self.opts.name));
        let wal = Wal::open(dst.join("wal"), wal_opts)?;
        wal.truncate_front(log_number)?;
        for rec in self.wal.iter(log_number..wal_end) {
            let (_, rec) = rec?;
            wal.append(&rec)?;
        }
        wal.close()?;
        let next_file = self.tree.lock().next_file;
        let state = view.version.state(seq, next_file);
        Manifest::create(dst, 1, &state)?;
        manifest::sync_dir(dst)?;
        if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
            manifest::sync_dir(parent)?;
        }
        Ok(())
    }
}
