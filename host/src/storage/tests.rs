use super::*;
use ballot_core::Commit;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ballot-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn writes_survive_reopen_and_the_boot_counter_grows() {
    let dir = tmp("reopen");
    let first;
    let identity;
    {
        let (s, inc) = Storage::open(&dir, 3, 1 << 26).unwrap();
        // A new directory starts at a random incarnation below 2^40.
        assert!((1..=1 << 40).contains(&inc), "{inc}");
        first = inc;
        identity = s.identity();
        let writes = [
            Write {
                key: b"a".to_vec(),
                state: vec![1, 2],
                commit: Some(Commit {
                    version: 1,
                    value: Some(b"x".to_vec()),
                }),
            },
            Write {
                key: b"b".to_vec(),
                state: vec![3],
                commit: None,
            },
            Write {
                key: b"a".to_vec(),
                state: vec![4],
                commit: Some(Commit {
                    version: 2,
                    value: None,
                }),
            },
        ];
        let stats = s.commit(writes.iter()).unwrap();
        assert_eq!(stats.writes, 3);
    }
    let (s, inc) = Storage::open(&dir, 3, 1 << 26).unwrap();
    assert_eq!(inc, first + 1);
    assert_eq!(
        s.identity(),
        identity,
        "a reopened directory keeps its identity"
    );
    assert_eq!(s.incarnation().unwrap(), first + 1);
    assert_eq!(s.bump_incarnation().unwrap(), first + 2);
    assert_eq!(s.incarnation().unwrap(), first + 2);
    let keys: [&[u8]; 3] = [b"a", b"b", b"c"];
    let states = s.states_within(&keys, usize::MAX, |_| None).unwrap();
    assert_eq!(states[0].1, vec![4]);
    assert_eq!(states[1].1, vec![3]);
    assert!(states[2].1.is_empty());
    // A state not durable yet is read instead of the file's; the bound
    // stops before the state that would pass it, after at least one.
    let pending = [7u8, 7];
    let states = s
        .states_within(&keys, 2, |k| (k == b"b").then_some(&pending[..]))
        .unwrap();
    assert_eq!(states, vec![(&b"a"[..], vec![4])]);
    let states = s
        .states_within(&keys[1..], 0, |k| (k == b"b").then_some(&pending[..]))
        .unwrap();
    assert_eq!(states, vec![(&b"b"[..], vec![7, 7])]);
    let states = s.states_within(&keys, 3, |_| None).unwrap();
    assert_eq!(states.len(), 3, "an empty state costs nothing");
    // Listing: the empty prefix (LMDB refuses an empty bound), a prefix,
    // and `after` inside and before it.
    assert_eq!(s.state_keys_in(b"", None, 10).unwrap(), [b"a", b"b"]);
    assert_eq!(s.state_keys_in(b"", Some(b""), 10).unwrap(), [b"a", b"b"]);
    assert_eq!(s.state_keys_in(b"", Some(b"a"), 10).unwrap(), [b"b"]);
    assert_eq!(s.state_keys_in(b"b", None, 10).unwrap(), [b"b"]);
    assert_eq!(s.state_keys_in(b"b", Some(b"a"), 10).unwrap(), [b"b"]);
    assert!(s.state_keys_in(b"b", Some(b"b"), 10).unwrap().is_empty());
    assert_eq!(s.state_keys_in(b"", None, 1).unwrap(), [b"a"]);
    assert_eq!(
        s.committed(b"a").unwrap(),
        Some(Committed {
            version: 2,
            value: None
        })
    );
    assert_eq!(s.committed(b"b").unwrap(), None);
    let log = s.changes(1, 10).unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].seq, &log[0].key[..], log[0].version),
        (1, &b"a"[..], 1)
    );
    assert_eq!((log[1].seq, log[1].version), (2, 2));
    drop(s);
    // Another replica's directory is refused.
    let err = Storage::open(&dir, 4, 1 << 26).err().unwrap();
    assert!(err.to_string().contains("belongs to replica 3"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_changelog_truncates_but_keeps_its_newest_entry_and_cursors_persist() {
    let dir = tmp("truncate");
    let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    assert_eq!(storage.changelog_bounds().unwrap(), (1, 0));
    let writes: Vec<Write> = (0..10u64)
        .map(|i| Write {
            key: format!("k{}", i % 4).into_bytes(),
            state: vec![1],
            commit: Some(ballot_core::Commit {
                version: i + 1,
                value: Some(vec![i as u8]),
            }),
        })
        .collect();
    storage.commit(writes.iter()).unwrap();
    assert_eq!(storage.changelog_bounds().unwrap(), (1, 10));
    assert_eq!(storage.truncate_changelog(4).unwrap(), 4);
    assert_eq!(storage.changelog_bounds().unwrap(), (5, 10));
    // A page's bounds and entries come from one read: they agree.
    let (first, last, entries) = storage.changes_page(3, 100).unwrap();
    assert_eq!((first, last), (5, 10));
    assert_eq!(entries.first().map(|e| e.seq), Some(first));
    assert_eq!(entries.last().map(|e| e.seq), Some(last));
    // Never the newest entry: it numbers the next commit.
    assert_eq!(storage.truncate_changelog(u64::MAX).unwrap(), 5);
    assert_eq!(storage.changelog_bounds().unwrap(), (10, 10));
    storage.commit(writes[..1].iter()).unwrap();
    assert_eq!(storage.changelog_bounds().unwrap(), (10, 11));
    let versions = storage.versions(None, 10).unwrap();
    assert_eq!(versions.len(), 4);
    assert_eq!(storage.versions(Some(b"k2"), 10).unwrap().len(), 1);
    assert_eq!(
        storage.state_keys(Some(b"k0"), 2).unwrap(),
        vec![b"k1".to_vec(), b"k2".to_vec()]
    );
    assert_eq!(storage.cursor(2).unwrap(), 0);
    storage.set_cursor(2, 77).unwrap();
    drop(storage);
    let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    assert_eq!(storage.cursor(2).unwrap(), 77);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn record_bytes_are_fixed() {
    let mut out = Vec::new();
    encode_committed(&mut out, 2, Some(b"hi"));
    assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 2, b'h', b'i']);
    out.clear();
    encode_committed(&mut out, 7, None);
    assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0, 7, 0]);
    assert_eq!(record_u64(5), [1, 0, 0, 0, 0, 0, 0, 0, 5]);
    let id: DirIdentity = core::array::from_fn(|i| i as u8);
    let bytes = record_identity(&id);
    assert_eq!(bytes[..3], [1, 0, 1]);
    assert_eq!(bytes.len(), 17);
    assert_eq!(read_identity(&bytes).unwrap(), id);
    assert!(read_identity(&bytes[..16]).is_err());
    assert_eq!(identity_key(7), b"identity/\0\0\0\x07");
    assert_eq!(record_flag(false), [1, 0]);
    assert_eq!(record_flag(true), [1, 1]);
    assert!(read_flag(&[1, 2]).is_err());
}

/// Changelog entries, format 2 (written) and format 1 (read to migrate).
#[test]
fn changelog_entry_bytes_are_fixed() {
    let mut out = Vec::new();
    encode_change(&mut out, 3, b"ab");
    assert_eq!(out, [2, 0, 0, 0, 0, 0, 0, 0, 3, b'a', b'b']);
    assert_eq!(decode_change(&out), Some((3, &b"ab"[..])));
    assert_eq!(decode_change(&out[..9]), None, "a key is never empty");
    assert_eq!(decode_change(&[1, 0, 0, 0, 0, 0, 0, 0, 3, b'a']), None);
    let v1 = [
        1, 0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0, 0, 2, b'h', b'i', 0, 0, 0, 2, b'a', b'b',
    ];
    assert_eq!(decode_change_v1(&v1), Some((3, &b"ab"[..])));
    let deleted_v1 = [1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 1, b'k'];
    assert_eq!(decode_change_v1(&deleted_v1), Some((4, &b"k"[..])));
    assert_eq!(decode_change_v1(&v1[..v1.len() - 1]), None);
}

/// A format-1 directory (changelog entries with whole values) becomes
/// format 2 when opened: `meta/format` says 2, its entries read as before
/// (same sequence numbers, keys and versions), new entries hold no value,
/// and values and states are untouched.
#[test]
fn a_format_1_directory_becomes_format_2_when_opened() {
    let dir = tmp("migrate");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let write = |key: &[u8], version: u64, value: Option<&[u8]>| Write {
        key: key.to_vec(),
        state: vec![9],
        commit: Some(Commit {
            version,
            value: value.map(<[u8]>::to_vec),
        }),
    };
    s.commit([write(b"a", 1, Some(b"one")), write(b"b", 5, None)].iter())
        .unwrap();
    // Turn it into what a format-1 build left: its format record and its
    // changelog entries, byte for byte.
    {
        let mut wtxn = s.env.write_txn().unwrap();
        s.meta.put(&mut wtxn, META_FORMAT, &[1]).unwrap();
        // [1][version u64][present 1][len u32][value][key len u32][key]
        let one: &[u8] = &[
            1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 3, b'o', b'n', b'e', 0, 0, 0, 1, b'a',
        ];
        s.changelog.put(&mut wtxn, &1, one).unwrap();
        // [1][version u64][present 0][key len u32][key]
        let two: &[u8] = &[1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 1, b'b'];
        s.changelog.put(&mut wtxn, &2, two).unwrap();
        wtxn.commit().unwrap();
    }
    drop(s);
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let log = s.changes(1, 10).unwrap();
    let entries: Vec<_> = log.iter().map(|e| (e.seq, &e.key[..], e.version)).collect();
    assert_eq!(entries, [(1, &b"a"[..], 1), (2, &b"b"[..], 5)]);
    let rtxn = s.env.read_txn().unwrap();
    assert_eq!(s.meta.get(&rtxn, META_FORMAT).unwrap(), Some(&[2u8][..]));
    drop(rtxn);
    assert_eq!(
        s.committed(b"a").unwrap(),
        Some(Committed {
            version: 1,
            value: Some(b"one".to_vec())
        })
    );
    // New commits follow on in format 2, and both read back in order.
    s.commit([write(b"c", 1, Some(b"x"))].iter()).unwrap();
    assert_eq!(s.changes(3, 10).unwrap()[0].key, b"c");
    let rtxn = s.env.read_txn().unwrap();
    assert_eq!(
        s.changelog.get(&rtxn, &3).unwrap(),
        Some(&[2, 0, 0, 0, 0, 0, 0, 0, 1, b'c'][..])
    );
    assert_eq!(s.changelog.get(&rtxn, &1).unwrap().map(|b| b[0]), Some(1));
    drop(rtxn);
    assert_eq!(s.changes(1, 10).unwrap().len(), 3);
    drop(s);
    // A format this build does not know is refused, not guessed at.
    {
        let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
        let mut wtxn = s.env.write_txn().unwrap();
        s.meta.put(&mut wtxn, META_FORMAT, &[3]).unwrap();
        wtxn.commit().unwrap();
    }
    let err = Storage::open(&dir, 1, 1 << 26).err().unwrap();
    assert!(matches!(err, StorageError::Foreign(_)), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_directory_is_not_admitted_until_it_says_so() {
    let dir = tmp("admitted");
    let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    assert!(!s.admitted().unwrap());
    drop(s);
    // A crash before admission leaves it unadmitted.
    let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    assert!(!s.admitted().unwrap());
    s.set_admitted().unwrap();
    assert!(s.admitted().unwrap());
    drop(s);
    let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    assert!(s.admitted().unwrap());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn peers_identities_are_recorded_once_and_a_new_directory_is_told_apart() {
    let dir = tmp("identities");
    let other = tmp("identities-other");
    let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    let (a, _) = Storage::open(&other, 2, 1 << 24).unwrap();
    assert_ne!(
        s.identity(),
        a.identity(),
        "directories draw their own identity"
    );
    let first = a.identity();
    assert_eq!(
        s.check_peer_identity(2, &first).unwrap(),
        PeerIdentity::First
    );
    assert_eq!(
        s.check_peer_identity(2, &first).unwrap(),
        PeerIdentity::Known
    );
    assert_eq!(s.known_peer_identity(2).unwrap(), Some(first));
    assert_eq!(s.known_peer_identity(3).unwrap(), None);
    let blank = [9u8; IDENTITY_LEN];
    assert_eq!(
        s.check_peer_identity(2, &blank).unwrap(),
        PeerIdentity::Changed { known: first }
    );
    drop(s);
    let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
    assert_eq!(
        s.check_peer_identity(2, &blank).unwrap(),
        PeerIdentity::Changed { known: first },
        "the record survives a restart"
    );
    // Once replica 2 has left the cluster, a new directory may join as 2.
    s.forget_peer_identity(2).unwrap();
    assert_eq!(
        s.check_peer_identity(2, &blank).unwrap(),
        PeerIdentity::First
    );
    // The adopted membership record round-trips.
    assert_eq!(s.adopted_members().unwrap(), None);
    s.set_adopted_members(b"{}").unwrap();
    assert_eq!(s.adopted_members().unwrap(), Some(b"{}".to_vec()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn a_full_map_is_its_own_error_and_what_was_committed_stays() {
    let dir = tmp("full");
    let (s, _) = Storage::open(&dir, 1, 1 << 20).unwrap();
    let write = |i: u32| Write {
        key: format!("k{i}").into_bytes(),
        state: vec![7; 4096],
        commit: Some(Commit {
            version: 1,
            value: Some(vec![9; 4096]),
        }),
    };
    s.commit([write(0)].iter()).unwrap();
    let full = (1..2000).find_map(|i| s.commit([write(i)].iter()).err());
    assert_eq!(full, Some(StorageError::Full), "a 1 MiB map fills");
    assert!(full.unwrap().to_string().contains("map_size_mib"));
    assert_eq!(s.committed(b"k0").unwrap().map(|c| c.version), Some(1));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_directory_of_another_replica_is_foreign() {
    let dir = tmp("foreign");
    drop(Storage::open(&dir, 1, 1 << 26).unwrap());
    match Storage::open(&dir, 2, 1 << 26) {
        Err(StorageError::Foreign(m)) => assert!(m.contains("belongs to replica 1"), "{m}"),
        Err(e) => panic!("another kind: {e:?}"),
        Ok(_) => panic!("replica 2 opened replica 1's directory"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
