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
        let stats = s.commit(writes.to_vec()).unwrap();
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
    storage.commit(writes.to_vec()).unwrap();
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
    storage.commit(writes[..1].to_vec()).unwrap();
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

/// A format-1 directory (changelog entries with whole values) takes the
/// current format when opened: `meta/format` says so, its entries read as before
/// (same sequence numbers, keys and versions), new entries hold no value,
/// and values and states are untouched.
#[test]
fn a_format_1_directory_takes_the_current_format_when_opened() {
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
    s.commit(vec![write(b"a", 1, Some(b"one")), write(b"b", 5, None)])
        .unwrap();
    s.wal.settle().unwrap();
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
    assert_eq!(
        s.meta.get(&rtxn, META_FORMAT).unwrap(),
        Some(&[DIRECTORY_FORMAT][..])
    );
    drop(rtxn);
    assert_eq!(
        s.committed(b"a").unwrap(),
        Some(Committed {
            version: 1,
            value: Some(b"one".to_vec())
        })
    );
    // New commits follow on in changelog format 2, and both read back in order.
    s.commit(vec![write(b"c", 1, Some(b"x"))]).unwrap();
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
        s.meta.put(&mut wtxn, META_FORMAT, &[4]).unwrap();
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
    s.commit([write(0)].to_vec()).unwrap();
    // A commit is durable once logged; the map fills when the applier
    // moves it into LMDB, and the commits after that are refused.
    let mut acknowledged = 1;
    let full = (1..2000).find_map(|i| match s.commit([write(i)].to_vec()) {
        Ok(_) => {
            acknowledged += 1;
            None
        }
        Err(e) => Some(e),
    });
    assert_eq!(full, Some(StorageError::Full), "a 1 MiB map fills");
    assert!(full.unwrap().to_string().contains("map_size_mib"));
    // Reads of LMDB, which lacks what the applier could not take, fail
    // with the same error rather than answer without it.
    assert_eq!(s.committed(b"k0").err(), Some(StorageError::Full));
    drop(s);
    // The same map cannot take the log's records either: refused, whole.
    assert_eq!(
        Storage::open(&dir, 1, 1 << 20).err(),
        Some(StorageError::Full)
    );
    // A larger one takes every acknowledged write.
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    assert_eq!(s.versions(None, usize::MAX).unwrap().len(), acknowledged);
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

fn put(key: &[u8], version: u64, value: &[u8]) -> Write {
    Write {
        key: key.to_vec(),
        state: vec![version as u8; 3],
        commit: Some(Commit {
            version,
            value: Some(value.to_vec()),
        }),
    }
}

fn wal_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(wal::WAL_FILE)
}

#[test]
fn log_record_bytes_are_fixed() {
    let mut out = Vec::new();
    let writes = [
        put(b"k", 1, b"v"),
        Write {
            key: b"j".to_vec(),
            state: vec![],
            commit: None,
        },
    ];
    wal::encode_record(&mut out, 0x0102_0304_0506_0708, 7, &writes);
    let payload: &[u8] = &[
        0, 0, 0, 2, // two writes
        0, 0, 0, 1, b'k', 0, 0, 0, 3, 1, 1, 1, // key, state
        1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, b'v', // commit: version 1, "v"
        0, 0, 0, 1, b'j', 0, 0, 0, 0, 0, // key, empty state, no commit
    ];
    let mut expected = vec![WAL_FORMAT, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 7];
    expected.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&expected);
    crc.update(payload);
    expected.extend_from_slice(&crc.finalize().to_be_bytes());
    expected.extend_from_slice(payload);
    assert_eq!(out, expected);
    // The checksum is CRC-32 (IEEE): pinned, not only recomputed.
    assert_eq!(&out[21..25], &[80, 73, 73, 124]);
    assert_eq!(
        wal::decode_records(&out, 0).unwrap(),
        vec![(7, writes.to_vec())]
    );
}

/// Reading the log stops at the first record that is cut short, fails its
/// checksum or does not follow the one before: what lies after the end of
/// the last append (a torn write, or older records under a rewound file)
/// is never taken for a record.
#[test]
fn the_log_ends_at_the_first_record_that_is_torn_damaged_or_out_of_order() {
    let salted = |salt: u64, seq: u64, key: &[u8]| {
        let mut out = Vec::new();
        wal::encode_record(&mut out, salt, seq, &[put(key, seq, b"x")]);
        out
    };
    let record = |seq: u64, key: &[u8]| salted(77, seq, key);
    let seqs = |bytes: &[u8]| -> Vec<u64> {
        let records = wal::decode_records(bytes, 0).unwrap();
        records.iter().map(|(s, _)| *s).collect()
    };
    let (r7, r8, r9) = (record(7, b"a"), record(8, b"b"), record(9, b"c"));
    assert_eq!(seqs(&[r7.clone(), r8.clone()].concat()), [7, 8]);
    // Torn: the next record cut anywhere.
    for cut in 1..r8.len() {
        assert_eq!(seqs(&[&r7[..], &r8[..cut]].concat()), [7], "cut at {cut}");
    }
    // Damaged: any byte of the next record flipped.
    for at in 0..r8.len() {
        let mut bad = r8.clone();
        bad[at] ^= 0x40;
        assert_eq!(seqs(&[&r7[..], &bad[..]].concat()), [7], "byte {at}");
    }
    // An older record ends it.
    assert_eq!(seqs(&[r8.clone(), r7.clone()].concat()), [8]);
    // Another salt: a record of the file's life before a rewind, or one
    // a client wrote inside a value, however well it is numbered.
    assert_eq!(seqs(&[r7.clone(), salted(78, 8, b"b")].concat()), [7]);
    // Zeros (a file extended but not written) end it too.
    assert_eq!(seqs(&[r7.clone(), vec![0; 64]].concat()), [7]);
    assert!(seqs(&[]).is_empty());

    // Damage, not an end: an intact later record of the same salt after
    // it means acknowledged records were lost. A gap; a damaged or torn
    // record before the next; the damaged first record before the next.
    let corrupt = |bytes: &[u8], what: &str| match wal::decode_records(bytes, 0) {
        Err(Error::Corrupt(m)) => assert!(m.contains("record 9"), "{what}: {m}"),
        other => panic!("{what}: {:?}", other.map(|r| r.len())),
    };
    corrupt(&[r7.clone(), r9.clone()].concat(), "a gap");
    for at in 0..r8.len() {
        let mut bad = r8.clone();
        bad[at] ^= 0x40;
        corrupt(
            &[&r7[..], &bad[..], &r9[..]].concat(),
            &format!("byte {at} of 8"),
        );
        // Past the salt, a damaged first record is found out too.
        if at >= 9 {
            corrupt(
                &[&bad[..], &r9[..]].concat(),
                &format!("byte {at} of the first"),
            );
        }
    }
    for cut in 1..r8.len() {
        corrupt(
            &[&r7[..], &r8[..cut], &r9[..]].concat(),
            &format!("8 cut at {cut}"),
        );
    }
    // A later record of another salt is not evidence.
    let mut bad = r8.clone();
    bad[30] ^= 0x40;
    assert_eq!(
        seqs(&[&r7[..], &bad[..], &salted(78, 9, b"c")[..]].concat()),
        [7]
    );
    // Nor one LMDB already holds: a rewound file whose new first record
    // tore shows the old pass again, damaged where the tear landed.
    let damaged_pass = [&r7[..], &bad[..], &r9[..]].concat();
    let read = wal::decode_records(&damaged_pass, 9).unwrap();
    assert_eq!(read.iter().map(|r| r.0).collect::<Vec<_>>(), [7]);
    corrupt(&damaged_pass, "the same pass when LMDB holds less");
    // Nor does a first header that is not a record give the salt: zeros
    // (a tear at the first page after an open), then a client's value
    // shaped like a record of salt 0.
    let zeros_then_forged = [&[0u8; 64][..], &salted(0, 1 << 63, b"x")[..]].concat();
    assert!(wal::decode_records(&zeros_then_forged, 0)
        .unwrap()
        .is_empty());
}

/// A record the log made durable but LMDB never received (the process
/// died between the two) is applied when the directory is opened, once,
/// after those LMDB holds; a torn record after it is not.
#[test]
fn records_logged_but_not_applied_are_applied_when_opened() {
    let dir = tmp("replay");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    s.commit(vec![put(b"a", 1, b"one")]).unwrap();
    s.commit(vec![put(b"b", 1, b"two")]).unwrap();
    drop(s);
    // The file still holds records 1 and 2, applied; add 3 and 4 as a
    // writer that died before its applier would have left them, then
    // half of 5.
    let file = std::fs::read(wal_path(&dir)).unwrap();
    let kept = wal::decode_records(&file, 0).unwrap();
    assert_eq!(kept.len(), 2, "records 1 and 2 stay until the next open");
    let salt = u64::from_be_bytes(file[1..9].try_into().unwrap());
    let mut log = Vec::new();
    for (seq, writes) in &kept {
        wal::encode_record(&mut log, salt, *seq, writes);
    }
    wal::encode_record(&mut log, salt, 3, &[put(b"a", 2, b"three")]);
    let four = [put(b"c", 1, b"four"), put(b"a", 3, b"four")];
    wal::encode_record(&mut log, salt, 4, &four);
    let mut torn = Vec::new();
    wal::encode_record(&mut torn, salt, 5, &[put(b"d", 1, b"never")]);
    log.extend_from_slice(&torn[..torn.len() - 2]);
    std::fs::write(wal_path(&dir), &log).unwrap();
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let version = |k: &[u8]| s.committed(k).unwrap().map(|c| c.version);
    assert_eq!(version(b"a"), Some(3));
    assert_eq!(version(b"c"), Some(1));
    assert_eq!(version(b"d"), None, "the torn record is not applied");
    let log: Vec<_> = s
        .changes(1, 10)
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.version))
        .collect();
    let expected: Vec<(Vec<u8>, u64)> = vec![
        (b"a".to_vec(), 1),
        (b"b".to_vec(), 1),
        (b"a".to_vec(), 2),
        (b"c".to_vec(), 1),
        (b"a".to_vec(), 3),
    ];
    assert_eq!(log, expected, "each record applied once, in order");
    let emptied = std::fs::read(wal_path(&dir)).unwrap();
    assert!(
        wal::decode_records(&emptied, 0).unwrap().is_empty(),
        "the log starts over"
    );
    // Numbering goes on after the replayed records.
    s.commit(vec![put(b"e", 1, b"five")]).unwrap();
    drop(s);
    let records = wal::decode_records(&std::fs::read(wal_path(&dir)).unwrap(), 0).unwrap();
    assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), [5]);
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    assert_eq!(s.changes(1, 10).unwrap().len(), 6);
    drop(s);
    // A log that starts after a record LMDB never held is damage: refused.
    let mut gap = Vec::new();
    wal::encode_record(&mut gap, 1, 9, &[put(b"f", 1, b"gap")]);
    std::fs::write(wal_path(&dir), &gap).unwrap();
    match Storage::open(&dir, 1, 1 << 26) {
        Err(StorageError::Corrupt(m)) => assert!(m.contains("starts at record 9"), "{m}"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a log with a gap was opened"),
    }
    // Damage in the middle, with records after it: refused, not cut
    // short there (records 7 and 8 were acknowledged).
    let mut damaged = Vec::new();
    for (seq, key) in [(6, b"f"), (7, b"g"), (8, b"h")] {
        wal::encode_record(&mut damaged, 1, seq, &[put(key, 1, b"v")]);
    }
    let second = damaged.len() / 3;
    damaged[second + 30] ^= 1;
    std::fs::write(wal_path(&dir), &damaged).unwrap();
    match Storage::open(&dir, 1, 1 << 26) {
        Err(StorageError::Corrupt(m)) => assert!(m.contains("record 8"), "{m}"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a log damaged in the middle was opened"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file rewound under a new salt whose first record tore at its first
/// page still shows the old pass's first record, then damage, then the
/// rest of the old pass: all of it applied (a rewind waits for that), so
/// the directory opens with every write.
#[test]
fn a_rewound_log_torn_at_its_first_page_opens() {
    let dir = tmp("rewound-torn");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    for (i, key) in [b"a", b"b", b"c"].iter().enumerate() {
        s.commit(vec![put(*key, 1, format!("v{i}").as_bytes())])
            .unwrap();
    }
    drop(s);
    let mut file = std::fs::read(wal_path(&dir)).unwrap();
    let kept = wal::decode_records(&file, 3).unwrap();
    assert_eq!(kept.len(), 3);
    let salt = u64::from_be_bytes(file[1..9].try_into().unwrap());
    let mut first = Vec::new();
    wal::encode_record(&mut first, salt, 1, &kept[0].1);
    // The new record's second page landed over record 2; its first page,
    // with the new salt, did not.
    let second = first.len();
    for b in &mut file[second + 3..second + 40] {
        *b ^= 0x5a;
    }
    std::fs::write(wal_path(&dir), &file).unwrap();
    let (s, _) = Storage::open(&dir, 1, 1 << 26).expect("a healthy directory opens");
    for key in [b"a", b"b", b"c"] {
        assert_eq!(s.committed(key).unwrap().map(|c| c.version), Some(1));
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nobody waits for the applier here: records reach LMDB by its delay
/// alone, including one appended while it was inside a transaction (an
/// append wakes it only when its queue was empty; behind a queued record
/// it sleeps until that record's delay is up).
#[test]
fn records_reach_lmdb_by_the_delay_alone() {
    let dir = tmp("delay-alone");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let drained = |s: &Storage, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.log_backlog().0 > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?} left",
                s.log_backlog()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    s.commit(vec![put(b"a", 1, b"one")]).unwrap();
    drained(&s, "a record into an empty queue");
    let held = s.hold_applier();
    s.commit(vec![put(b"b", 1, b"two")]).unwrap();
    // Past the delay: the applier has taken record 2 and waits for LMDB.
    std::thread::sleep(Duration::from_millis(300));
    s.commit(vec![put(b"c", 1, b"three")]).unwrap();
    assert_eq!(s.log_backlog().0, 2);
    drop(held);
    drained(&s, "a record appended during a transaction");
    for key in [b"a", b"b", b"c"] {
        assert_eq!(
            s.committed_applied(key).unwrap().map(|c| c.version),
            Some(1)
        );
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A read that waits for the applier on a worker of a multi-thread
/// runtime (a listing, a watcher, a peer's question) leaves the worker's
/// other tasks to run: with both workers of a two-worker runtime waiting,
/// a third task still runs.
#[test]
fn a_read_waiting_for_the_applier_does_not_hold_the_runtime() {
    let dir = tmp("block-in-place");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let held = s.hold_applier();
    s.commit(vec![put(b"k", 1, b"v")]).unwrap();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let s = s.clone();
            rt.spawn(async move { s.state_keys(None, 10).unwrap().len() })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        readers.iter().all(|r| !r.is_finished()),
        "the reads wait for the applier"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(());
    });
    let probe_ran = rx.recv_timeout(Duration::from_secs(2)).is_ok();
    drop(held);
    for r in readers {
        assert_eq!(rt.block_on(r).unwrap(), 1, "the read saw the logged write");
    }
    assert!(
        probe_ran,
        "a task waited behind reads that wait for the applier"
    );
    drop(rt);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Between the log's fsync and the applier's transaction a write is
/// durable but not in LMDB: the core's state loads find it in the log,
/// and every other read waits for LMDB to hold it. The applier is held at
/// LMDB's write lock.
#[test]
fn reads_see_what_was_logged_before_lmdb_holds_it() {
    let dir = tmp("settle");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    s.commit(vec![put(b"k", 1, b"old")]).unwrap();
    s.wal.settle().unwrap();
    let held = s.hold_applier();
    s.commit(vec![put(b"k", 2, b"new"), put(b"l", 1, b"new")])
        .unwrap();
    let states = s
        .states_within(&[b"k", b"l"], usize::MAX, |_| None)
        .unwrap();
    assert_eq!(
        states[0].1,
        vec![2; 3],
        "the state load found the logged state"
    );
    assert_eq!(states[1].1, vec![1; 3]);
    // Each read on a thread of its own, so that one that did not wait
    // shows as finished while the applier is held.
    type Read = Box<dyn FnOnce(&Storage) -> String + Send>;
    let reads: Vec<(&str, Read)> = vec![
        (
            "committed",
            Box::new(|s| format!("{:?}", s.committed(b"k").unwrap().map(|c| c.version))),
        ),
        (
            "changelog_bounds",
            Box::new(|s| format!("{:?}", s.changelog_bounds().unwrap())),
        ),
        (
            "changes",
            Box::new(|s| format!("{}", s.changes(1, 10).unwrap().len())),
        ),
        (
            "changes_page",
            Box::new(|s| format!("{}", s.changes_page(1, 10).unwrap().2.len())),
        ),
        (
            "state_keys",
            Box::new(|s| format!("{}", s.state_keys(None, 10).unwrap().len())),
        ),
        (
            "state_keys_in",
            Box::new(|s| format!("{}", s.state_keys_in(b"", None, 10).unwrap().len())),
        ),
        (
            "versions",
            Box::new(|s| format!("{}", s.versions(None, 10).unwrap().len())),
        ),
    ];
    let readers: Vec<_> = reads
        .into_iter()
        .map(|(name, read)| {
            let s = s.clone();
            (name, std::thread::spawn(move || read(&s)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for (name, reader) in &readers {
        assert!(!reader.is_finished(), "{name} did not wait for LMDB");
    }
    drop(held);
    let seen: Vec<(&str, String)> = readers
        .into_iter()
        .map(|(name, reader)| (name, reader.join().unwrap()))
        .collect();
    let expected = [
        ("committed", "Some(2)"),
        ("changelog_bounds", "(1, 3)"),
        ("changes", "3"),
        ("changes_page", "3"),
        ("state_keys", "2"),
        ("state_keys_in", "2"),
        ("versions", "2"),
    ];
    let seen: Vec<(&str, &str)> = seen.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(seen, expected);
    let states = s.states_within(&[b"k"], usize::MAX, |_| None).unwrap();
    assert_eq!(states[0].1, vec![2; 3], "and LMDB once applied");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file is written from its start again once LMDB holds everything
/// logged: four times [`wal::FILE_MAX`] goes through a file that never
/// passes its preallocated size (or `FILE_MAX` and one record), with
/// nobody reading (the writer hurries the applier, then waits for it),
/// and all of it is there after a reopen.
#[test]
fn the_log_rewinds_and_stays_bounded() {
    let dir = tmp("rewind");
    let (s, _) = Storage::open(&dir, 1, 1 << 28).unwrap();
    let value = vec![5u8; 64 << 10];
    let rounds = 4 * (wal::FILE_MAX as usize) / value.len();
    for i in 0..rounds {
        s.commit(vec![put(format!("k{i}").as_bytes(), 1, &value)])
            .unwrap();
    }
    let len = std::fs::metadata(wal_path(&dir)).unwrap().len();
    let bound = wal::PREALLOCATE.max(wal::FILE_MAX + 2 * value.len() as u64);
    assert!(len <= bound, "the log grew to {len} bytes");
    drop(s);
    let (s, _) = Storage::open(&dir, 1, 1 << 28).unwrap();
    assert_eq!(s.versions(None, usize::MAX).unwrap().len(), rounds);
    assert_eq!(s.changelog_bounds().unwrap(), (1, rounds as u64));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A format-2 directory (from before the log) takes format 3 when opened,
/// with nothing else to move; what it held reads as before.
#[test]
fn a_format_2_directory_takes_format_3_when_opened() {
    let dir = tmp("format2");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    s.commit(vec![put(b"a", 1, b"one")]).unwrap();
    s.wal.settle().unwrap();
    {
        let mut wtxn = s.env.write_txn().unwrap();
        s.meta.put(&mut wtxn, META_FORMAT, &[2]).unwrap();
        // A format-2 build kept no log position.
        s.meta.delete(&mut wtxn, META_WAL).unwrap();
        wtxn.commit().unwrap();
    }
    drop(s);
    std::fs::remove_file(wal_path(&dir)).unwrap();
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let rtxn = s.env.read_txn().unwrap();
    assert_eq!(s.meta.get(&rtxn, META_FORMAT).unwrap(), Some(&[3u8][..]));
    drop(rtxn);
    assert_eq!(s.committed(b"a").unwrap().map(|c| c.version), Some(1));
    s.commit(vec![put(b"b", 1, b"two")]).unwrap();
    assert_eq!(s.changelog_bounds().unwrap(), (1, 2));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An applier that panics is recorded as the log's failure, like one whose
/// transaction fails: reads that need LMDB and later appends fail with
/// it instead of waiting for ever, and the record stays in the file.
#[test]
fn an_applier_that_panics_fails_the_reads_and_appends_that_wait_for_it() {
    let dir = tmp("applier-panic");
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(wal_path(&dir))
        .unwrap();
    let log = Arc::new(wal::Wal::new(file, 0, 1));
    let applier = {
        let log = log.clone();
        std::thread::spawn(move || wal::applier(log, |_, _| panic!("planted")))
    };
    log.append(vec![put(b"k", 1, b"v")]).unwrap();
    let err = log.settle().unwrap_err();
    assert!(err.to_string().contains("panicked: planted"), "{err}");
    applier.join().unwrap();
    assert_eq!(log.failure(), Some(err.clone()));
    assert_eq!(log.append(vec![put(b"k", 2, b"w")]).err(), Some(err));
    let records = wal::decode_records(&std::fs::read(wal_path(&dir)).unwrap(), 0).unwrap();
    assert_eq!(
        records.len(),
        1,
        "the logged record stays for the next open"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the log holds and LMDB does not is told as a backlog, and each
/// applier transaction to the observer, with its records.
#[test]
fn the_backlog_and_the_applier_transactions_are_told() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tmp("observe");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    let applied = Arc::new(AtomicUsize::new(0));
    s.on_apply({
        let applied = applied.clone();
        move |_, records| {
            applied.fetch_add(records, Ordering::SeqCst);
        }
    });
    assert_eq!(s.log_backlog(), (0, 0));
    let held = s.hold_applier();
    s.commit(vec![put(b"k", 1, b"value")]).unwrap();
    s.commit(vec![put(b"l", 1, b"value")]).unwrap();
    // Key, three bytes of state and the value, twice.
    assert_eq!(s.log_backlog(), (2, 2 * (1 + 3 + 5)));
    drop(held);
    s.wal.settle().unwrap();
    assert_eq!(s.log_backlog(), (0, 0));
    assert_eq!(applied.load(Ordering::SeqCst), 2);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key LMDB would refuse fails its group before it is logged: the
/// applier would fail on it, and so would every open after.
#[test]
fn a_key_lmdb_refuses_fails_its_group_before_the_log() {
    let dir = tmp("bad-key");
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    for key in [vec![], vec![b'k'; LMDB_KEY_MAX + 1]] {
        let len = key.len();
        let group = vec![put(b"fine", 1, b"v"), put(&key, 1, b"v")];
        match s.commit(group) {
            Err(StorageError::Lmdb(m)) => assert!(m.contains("keys are 1 to 511"), "{m}"),
            other => panic!("a {len}-byte key: {other:?}"),
        }
    }
    assert_eq!(s.log_backlog(), (0, 0), "nothing was logged");
    s.commit(vec![put(&[b'k'; LMDB_KEY_MAX], 1, b"v")]).unwrap();
    drop(s);
    let (s, _) = Storage::open(&dir, 1, 1 << 26).unwrap();
    assert_eq!(s.versions(None, 10).unwrap().len(), 1);
    assert_eq!(s.committed(b"fine").unwrap(), None);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A commit that finds the file at its bound with records LMDB does not
/// hold waits for the applier, and says how long; one that finds room
/// does not wait.
#[test]
fn a_commit_at_the_files_bound_waits_for_the_applier_and_says_so() {
    let dir = tmp("bound-wait");
    let (s, _) = Storage::open(&dir, 1, 1 << 28).unwrap();
    let value = vec![5u8; 1 << 20];
    let first = s.commit(vec![put(b"k0", 1, &value)]).unwrap();
    assert!(first.waited.is_zero(), "{:?}", first.waited);
    let held = s.hold_applier();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            let rounds = wal::FILE_MAX as usize / value.len() + 1;
            // The longest wait, and when that commit returned.
            (1..=rounds)
                .map(|i| s.commit(vec![put(format!("k{i}").as_bytes(), 1, &value)]))
                .map(|r| (r.unwrap().waited, std::time::Instant::now()))
                .max()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !writer.is_finished(),
        "the writer went past the file's bound"
    );
    // How long the commit at the bound waits depends on how soon the
    // writer got there; that it waited, and returned only once the
    // applier was let go, does not.
    let released = std::time::Instant::now();
    drop(held);
    let (waited, returned) = writer.join().unwrap();
    assert!(!waited.is_zero(), "the commit at the bound says it waited");
    assert!(returned >= released, "it returned before the applier ran");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
