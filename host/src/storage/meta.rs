//! The `meta` database: the boot counter, the directory's identity and
//! admission, the identities of peers, the adopted membership and the
//! changelog cursors.

use super::record::*;
use super::{
    DirIdentity, Error, PeerIdentity, Storage, META_ADMITTED, META_INCARNATION, META_MEMBERS,
    STORAGE_FORMAT,
};

impl Storage {
    /// How far this replica has replayed `peer`'s changelog (0: not yet).
    pub fn cursor(&self, peer: u32) -> Result<u64, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, &cursor_key(peer))? {
            Some(bytes) => read_u64(bytes),
            None => Ok(0),
        }
    }

    /// Durably records how far this replica has replayed `peer`'s changelog.
    pub fn set_cursor(&self, peer: u32, seq: u64) -> Result<(), Error> {
        let mut wtxn = self.env.write_txn()?;
        self.meta
            .put(&mut wtxn, &cursor_key(peer), &record_u64(seq))?;
        wtxn.commit()?;
        Ok(())
    }

    /// Durably bumps the boot counter and returns it: a protocol instance
    /// started without a process restart (a swap, or recovery from a trap)
    /// must not reuse the proposal ids of the one it replaces.
    pub fn bump_incarnation(&self) -> Result<u64, Error> {
        let mut wtxn = self.env.write_txn()?;
        let incarnation = match self.meta.get(&wtxn, META_INCARNATION)? {
            Some(bytes) => read_u64(bytes)? + 1,
            None => 1,
        };
        self.meta
            .put(&mut wtxn, META_INCARNATION, &record_u64(incarnation))?;
        wtxn.commit()?;
        Ok(incarnation)
    }

    /// This data directory's identity.
    pub fn identity(&self) -> DirIdentity {
        self.identity
    }

    /// Whether this directory may vote: every start-up peer accepted it,
    /// it joined as a learner, or it predates admission. A directory
    /// created empty under an id its peers may know (a lost disk) is not,
    /// until [`Storage::set_admitted`].
    pub fn admitted(&self) -> Result<bool, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_ADMITTED)? {
            Some(bytes) => read_flag(bytes),
            None => Ok(false),
        }
    }

    /// Durably records that this directory may vote.
    pub fn set_admitted(&self) -> Result<(), Error> {
        let mut wtxn = self.env.write_txn()?;
        self.meta
            .put(&mut wtxn, META_ADMITTED, &record_flag(true))?;
        wtxn.commit()?;
        Ok(())
    }

    /// Checks the directory identity `peer` presents against the one
    /// recorded for it, recording it durably when there is none.
    pub fn check_peer_identity(
        &self,
        peer: u32,
        presented: &DirIdentity,
    ) -> Result<PeerIdentity, Error> {
        let verdict = |known: DirIdentity| {
            if &known == presented {
                PeerIdentity::Known
            } else {
                PeerIdentity::Changed { known }
            }
        };
        // Almost always known: a read transaction settles it.
        if let Some(known) = self.known_peer_identity(peer)? {
            return Ok(verdict(known));
        }
        let key = identity_key(peer);
        let mut wtxn = self.env.write_txn()?;
        let verdict = match self.meta.get(&wtxn, &key)? {
            Some(bytes) => verdict(read_identity(bytes)?),
            None => {
                self.meta
                    .put(&mut wtxn, &key, &record_identity(presented))?;
                PeerIdentity::First
            }
        };
        wtxn.commit()?;
        Ok(verdict)
    }

    /// The directory identity recorded for `peer`, if any.
    pub fn known_peer_identity(&self, peer: u32) -> Result<Option<DirIdentity>, Error> {
        let rtxn = self.env.read_txn()?;
        self.meta
            .get(&rtxn, &identity_key(peer))?
            .map(read_identity)
            .transpose()
    }

    /// Forgets the identity recorded for `peer` (it left the cluster; it
    /// may come back on a new directory through the learner stages).
    pub fn forget_peer_identity(&self, peer: u32) -> Result<(), Error> {
        let mut wtxn = self.env.write_txn()?;
        self.meta.delete(&mut wtxn, &identity_key(peer))?;
        wtxn.commit()?;
        Ok(())
    }

    /// Durably records the membership record this replica adopted (its
    /// encoding), before the protocol votes in its epoch.
    pub fn set_adopted_members(&self, record: &[u8]) -> Result<(), Error> {
        let mut out = Vec::with_capacity(record.len() + 1);
        out.push(STORAGE_FORMAT);
        out.extend_from_slice(record);
        let mut wtxn = self.env.write_txn()?;
        self.meta.put(&mut wtxn, META_MEMBERS, &out)?;
        wtxn.commit()?;
        Ok(())
    }

    /// The membership record this replica last adopted, if any.
    pub fn adopted_members(&self) -> Result<Option<Vec<u8>>, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_MEMBERS)? {
            None => Ok(None),
            Some([STORAGE_FORMAT, rest @ ..]) => Ok(Some(rest.to_vec())),
            Some(other) => Err(Error::Foreign(format!(
                "the adopted membership record has format {:?}; this build reads {STORAGE_FORMAT}",
                other.first()
            ))),
        }
    }

    /// The boot counter as persisted.
    pub fn incarnation(&self) -> Result<u64, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_INCARNATION)? {
            Some(bytes) => read_u64(bytes),
            None => Err(Error::Corrupt("no incarnation recorded".into())),
        }
    }
}
