//! Audit log tests through the public API: an untouched log verifies, each
//! kind of tampering is found at the exact `seq`, and crashes, restarts,
//! rotation, retention and a full disk keep the chain whole. Tampering is
//! done with an independent implementation of the record format, as an
//! intruder would.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use sluice::audit::{self, AuditHealth, AuditLog, AuditSettings, VerifyReport};
use sluice::events::{Event, EventType, Sink};

fn settings(dir: &Path, seal_every: u64) -> AuditSettings {
    let mut settings = AuditSettings::new(dir.to_path_buf(), Arc::from("edge-01"));
    settings.seal_every = seal_every;
    settings.seal_interval = Duration::from_secs(3600);
    settings
}

fn event(n: u64) -> Event {
    let mut event = Event::new(EventType::Decision);
    event.id = format!("e-{n}");
    event.gateway = Arc::from("edge-01");
    event.vendor = Some(Arc::from("acme"));
    event.reason = Some(format!("request number {n}"));
    event
}

fn write_events(log: &mut AuditLog, first: u64, count: u64) {
    let batch: Vec<Event> = (first..first + count).map(event).collect();
    log.write_batch(&batch).unwrap();
    log.sync().unwrap();
}

/// Creates a sealed log of `events` events, sealing every `seal_every`, and
/// returns the verification key.
fn sealed_log(dir: &Path, events: u64, seal_every: u64) -> [u8; 32] {
    let key = audit::init_key(dir, false).unwrap();
    let (mut log, _) = AuditLog::open(settings(dir, seal_every), Arc::default()).unwrap();
    write_events(&mut log, 1, events);
    decode_key(&key)
}

fn decode_key(text: &str) -> [u8; 32] {
    hex::decode(text).unwrap().try_into().unwrap()
}

fn first_segment(dir: &Path) -> PathBuf {
    dir.join("audit-000001.jsonl")
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

fn verify(dir: &Path, key: &[u8; 32]) -> VerifyReport {
    audit::verify(dir, key, None).unwrap()
}

fn first_bad(dir: &Path, key: &[u8; 32]) -> (u64, String) {
    verify(dir, key).first_bad.expect("a bad record")
}

// The record format, written again from docs/audit.md.

/// Returns the event members of a line: everything before `seq`.
fn body(line: &str) -> String {
    let cut = line.rfind(",\"seq\":").unwrap();
    format!("{}}}", &line[..cut])
}

fn member<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line.rfind(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
    &line[start..start + 64]
}

/// Chains `body` as record `seq` after `prev`; returns the line and its hash.
fn chain(body: &str, seq: u64, prev: &str) -> (String, String) {
    let open = &body[..body.len() - 1];
    let canonical = format!("{open},\"seq\":{seq},\"prev_hash\":\"{prev}\"}}");
    let hash = hex::encode(Sha256::digest(canonical.as_bytes()));
    let line = format!(
        "{},\"hash\":\"{hash}\"}}",
        &canonical[..canonical.len() - 1]
    );
    (line, hash)
}

/// Rechains `lines[from..]` after a change, renumbering `seq` from the
/// position; seal records keep their members, so their MACs go stale.
fn rechain(lines: &mut [String], from: usize) {
    for index in from..lines.len() {
        let prev = if index == 0 {
            "0".repeat(64)
        } else {
            member(&lines[index - 1], "hash").to_owned()
        };
        let (line, _) = chain(&body(&lines[index]), index as u64 + 1, &prev);
        lines[index] = line;
    }
}

fn forged_seal(key: &[u8; 32], epoch: u64, seq: u64, prev: &str) -> String {
    let message = format!("sluice-audit-seal|epoch={epoch}|seq={seq}|prev_hash={prev}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(message.as_bytes());
    let mac = hex::encode(mac.finalize().into_bytes());
    let body = format!(
        r#"{{"id":"seal-{seq}","timestamp":"2026-01-01T00:00:00.000000Z","gateway":"edge-01","event_type":"seal","action":"seal","detail":{{"epoch":{epoch},"mac":"{mac}"}}}}"#
    );
    chain(&body, seq, prev).0
}

fn stored_key(dir: &Path) -> (u64, [u8; 32]) {
    let text = fs::read_to_string(dir.join("audit.key")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = decode_key(value["key"].as_str().unwrap());
    (value["epoch"].as_u64().unwrap(), key)
}

#[test]
fn untouched_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let report = verify(dir.path(), &key);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.records, 27);
    assert_eq!(report.seals, 2);
    assert_eq!(report.first_seq, Some(1));
    assert_eq!(report.last_seq, Some(27));
    assert_eq!(report.unsealed, Some((23, 27)));
    assert_eq!(
        report.to_string(),
        "checked 27 records (seq 1-27), 2 seals\n\
         records 23-27 are not sealed yet\n\
         audit log verified\n"
    );
}

#[test]
fn seals_sit_after_every_seal_every_records() {
    let dir = tempfile::tempdir().unwrap();
    sealed_log(dir.path(), 25, 10);
    let lines = read_lines(&first_segment(dir.path()));
    let seals: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains(r#""event_type":"seal""#))
        .collect();
    assert_eq!(seals, vec![10, 21]);
    assert!(lines[10].contains(r#""detail":{"epoch":0,"mac":""#));
    assert!(lines[21].contains(r#""detail":{"epoch":1,"mac":""#));
    assert_eq!(stored_key(dir.path()).0, 2);
}

#[test]
fn changed_field_names_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines[4] = lines[4].replace("request number 5", "request number 6");
    write_lines(&path, &lines);
    assert_eq!(first_bad(dir.path(), &key), (5, "hash mismatch".into()));
}

#[test]
fn removed_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines.remove(4);
    write_lines(&path, &lines);
    assert_eq!(
        first_bad(dir.path(), &key),
        (5, "missing or out of order: seq 6 follows seq 4".into())
    );
}

#[test]
fn swapped_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines.swap(4, 5);
    write_lines(&path, &lines);
    assert_eq!(
        first_bad(dir.path(), &key),
        (5, "missing or out of order: seq 6 follows seq 4".into())
    );
}

#[test]
fn inserted_forged_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    let forged_body = body(&lines[5]).replace("request number 6", "forged");
    let (forged, _) = chain(&forged_body, 6, member(&lines[4], "hash"));
    lines.insert(5, forged);
    write_lines(&path, &lines);
    assert_eq!(
        first_bad(dir.path(), &key),
        (6, "out of order or duplicated: found after seq 6".into())
    );
}

#[test]
fn inserted_record_with_rechained_tail_fails_next_seal() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines.insert(5, lines[5].replace("request number 6", "forged"));
    rechain(&mut lines, 5);
    write_lines(&path, &lines);
    // The first seal moved from seq 11 to 12 and its MAC no longer matches.
    assert_eq!(
        first_bad(dir.path(), &key),
        (
            12,
            "seal MAC does not verify with the key of epoch 0".into()
        )
    );
}

#[test]
fn changed_record_with_rechained_tail_fails_next_seal() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines[14] = lines[14].replace("request number 14", "request number 99");
    rechain(&mut lines, 14);
    write_lines(&path, &lines);
    assert_eq!(
        first_bad(dir.path(), &key),
        (
            22,
            "seal MAC does not verify with the key of epoch 1".into()
        )
    );
}

#[test]
fn tail_cut_after_a_seal_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let key_hex = audit::init_key(dir.path(), false).unwrap();
    let key = decode_key(&key_hex);
    let (mut log, _) = AuditLog::open(settings(dir.path(), 10), Arc::default()).unwrap();
    write_events(&mut log, 1, 25);
    log.seal_now().unwrap();
    drop(log);
    assert_eq!(stored_key(dir.path()).0, 3);

    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines.truncate(22);
    write_lines(&path, &lines);
    assert_eq!(
        first_bad(dir.path(), &key),
        (
            23,
            "missing: the log ends at seq 22, but the sealing key is at epoch 3, \
             so the seal of epoch 2 and the records before it were removed"
                .into()
        )
    );
}

#[test]
fn reseal_with_later_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    // The intruder has the current key (epoch 2) and rewrites record 15 (event 14),
    // which the epoch-1 seal at seq 22 covers.
    let (epoch, current_key) = stored_key(dir.path());
    assert_eq!(epoch, 2);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines[14] = lines[14].replace("request number 14", "request number 0");
    rechain(&mut lines, 14);

    for (label, expected) in [
        (1, "seal MAC does not verify with the key of epoch 1"),
        (2, "seal has epoch 2 where epoch 1 was expected"),
    ] {
        let mut forged = lines.clone();
        forged[21] = forged_seal(&current_key, label, 22, member(&forged[20], "hash"));
        rechain(&mut forged, 22);
        write_lines(&path, &forged);
        assert_eq!(first_bad(dir.path(), &key), (22, expected.into()));
    }
}

#[test]
fn wrong_verification_key_fails_first_seal() {
    let dir = tempfile::tempdir().unwrap();
    sealed_log(dir.path(), 25, 10);
    assert_eq!(
        first_bad(dir.path(), &[7; 32]),
        (
            11,
            "seal MAC does not verify with the key of epoch 0".into()
        )
    );
}

#[test]
fn verify_from_skips_earlier_records() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let path = first_segment(dir.path());
    let mut lines = read_lines(&path);
    lines[4] = lines[4].replace("request number 5", "request number 6");
    write_lines(&path, &lines);

    let report = audit::verify(dir.path(), &key, Some(15)).unwrap();
    assert_eq!(report.first_bad, None);
    assert_eq!(report.first_seq, Some(15));
    assert_eq!(report.records, 13);
    assert_eq!(report.seals, 1);
    assert_eq!(report.unsealed, Some((23, 27)));
}

#[test]
fn torn_last_line_is_removed_and_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 12, 10);
    let path = first_segment(dir.path());
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(br#"{"id":"e-13","times"#).unwrap();
    drop(file);

    let report = verify(dir.path(), &key);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.notes.len(), 1);

    let (mut log, open) = AuditLog::open(settings(dir.path(), 10), Arc::default()).unwrap();
    assert_eq!(open.torn_bytes, 19);
    assert_eq!(open.torn_segment, Some(path.clone()));
    assert_eq!(open.next_seq, 14);
    assert_eq!(open.epoch, Some(1));
    write_events(&mut log, 13, 10);
    log.seal_now().unwrap();

    let report = verify(dir.path(), &key);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.notes, Vec::<String>::new());
    assert_eq!(report.last_seq, Some(25));
    assert_eq!(report.seals, 3);
    assert_eq!(report.unsealed, None);
}

#[test]
fn seq_continues_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 3, 1000);
    let (mut log, report) = AuditLog::open(settings(dir.path(), 1000), Arc::default()).unwrap();
    assert_eq!(report.next_seq, 4);
    write_events(&mut log, 4, 2);
    log.seal_now().unwrap();
    drop(log);

    let lines = read_lines(&first_segment(dir.path()));
    let seqs: Vec<u64> = lines
        .iter()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    let report = verify(dir.path(), &key);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.seals, 1);
}

#[test]
fn unsealed_log_without_key_still_chains() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, report) = AuditLog::open(settings(dir.path(), 10), Arc::default()).unwrap();
    assert!(!report.sealed);
    write_events(&mut log, 1, 15);
    let report = verify(dir.path(), &[0; 32]);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.seals, 0);
    assert_eq!(report.unsealed, Some((1, 15)));
}

#[test]
fn interval_seal_follows_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let key = decode_key(&audit::init_key(dir.path(), false).unwrap());
    let mut interval_zero = settings(dir.path(), 1000);
    interval_zero.seal_interval = Duration::ZERO;
    let (mut log, _) = AuditLog::open(interval_zero, Arc::default()).unwrap();
    write_events(&mut log, 1, 2);
    log.tick().unwrap();
    assert_eq!(read_lines(&first_segment(dir.path())).len(), 3);
    let report = verify(dir.path(), &key);
    assert_eq!(report.seals, 1);
    assert_eq!(report.unsealed, None);
}

#[test]
fn rotation_spreads_records_over_segments() {
    let dir = tempfile::tempdir().unwrap();
    let key = decode_key(&audit::init_key(dir.path(), false).unwrap());
    let mut small = settings(dir.path(), 10);
    small.segment_bytes = 2048;
    let (mut log, _) = AuditLog::open(small, Arc::default()).unwrap();
    for round in 0..6 {
        write_events(&mut log, round * 10 + 1, 10);
    }
    drop(log);

    let segments: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    assert!(segments.len() >= 5, "{} segments", segments.len());
    for segment in &segments {
        assert!(fs::metadata(segment).unwrap().len() <= 2048);
    }
    let report = verify(dir.path(), &key);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.records, 66);
    assert_eq!(report.seals, 6);
}

fn age(path: &Path, days: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(days * 86_400))
        .unwrap();
}

#[test]
fn retention_removes_only_old_leading_segments() {
    let dir = tempfile::tempdir().unwrap();
    let key = decode_key(&audit::init_key(dir.path(), false).unwrap());
    let mut small = settings(dir.path(), 10);
    small.segment_bytes = 2048;
    let (mut log, _) = AuditLog::open(small.clone(), Arc::default()).unwrap();
    for round in 0..4 {
        write_events(&mut log, round * 10 + 1, 10);
    }
    drop(log);
    let segment = |n: u64| dir.path().join(audit::segment_name(n));
    assert!(segment(5).exists());

    age(&segment(1), 400);
    age(&segment(2), 366);
    age(&segment(3), 300);
    age(&segment(4), 400);
    let (_, report) = AuditLog::open(small.clone(), Arc::default()).unwrap();
    assert_eq!(report.removed_segments, vec![segment(1), segment(2)]);
    assert!(segment(3).exists());
    assert!(segment(4).exists());

    let verified = verify(dir.path(), &key);
    assert_eq!(verified.first_bad, None);
    assert_eq!(verified.notes.len(), 1);
}

#[test]
fn retention_keeps_the_newest_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut small = settings(dir.path(), 10);
    small.segment_bytes = 2048;
    let (mut log, _) = AuditLog::open(small.clone(), Arc::default()).unwrap();
    write_events(&mut log, 1, 20);
    drop(log);
    let segments = fs::read_dir(dir.path()).unwrap().count() as u64;
    for n in 1..=segments {
        age(&dir.path().join(audit::segment_name(n)), 1000);
    }
    let (_, report) = AuditLog::open(small, Arc::default()).unwrap();
    assert_eq!(report.removed_segments.len() as u64, segments - 1);
    assert!(dir.path().join(audit::segment_name(segments)).exists());
    assert_eq!(report.next_seq, 21);
}

const DISK_FULL_CHILD: &str = "SLUICE_AUDIT_DISK_FULL_DIR";

/// Runs in a child process because RLIMIT_FSIZE applies to the whole
/// process. SIGXFSZ is blocked in this thread so a write past the limit
/// fails with EFBIG instead of ending the process.
fn disk_full_child(dir: &Path) {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    use nix::sys::signal::{SigSet, Signal};

    let mut signals = SigSet::empty();
    signals.add(Signal::SIGXFSZ);
    signals.thread_block().unwrap();

    let health = Arc::new(AuditHealth::new());
    let (mut log, _) = AuditLog::open(settings(dir, 10), health.clone()).unwrap();
    write_events(&mut log, 1, 10);
    let size = fs::metadata(first_segment(dir)).unwrap().len();

    setrlimit(Resource::RLIMIT_FSIZE, size + 300, RLIM_INFINITY).unwrap();
    let batch: Vec<Event> = (11..31).map(event).collect();
    assert!(log.write_batch(&batch).is_err());
    assert!(log.sync().is_err());
    assert!(!health.is_writable());
    let batch: Vec<Event> = (31..36).map(event).collect();
    assert!(log.write_batch(&batch).is_err());
    assert!(!health.is_writable());
    assert_eq!(health.write_errors(), 3);
    assert_eq!(fs::metadata(first_segment(dir)).unwrap().len(), size);

    setrlimit(Resource::RLIMIT_FSIZE, RLIM_INFINITY, RLIM_INFINITY).unwrap();
    write_events(&mut log, 36, 3);
    assert!(health.is_writable());
    assert_eq!(health.records_written(), 38);
    assert_eq!(health.seals_written(), 3);
}

#[test]
fn disk_full_holds_records_until_writes_succeed() {
    if let Some(dir) = std::env::var_os(DISK_FULL_CHILD) {
        disk_full_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = decode_key(&audit::init_key(dir.path(), false).unwrap());
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "disk_full_holds_records_until_writes_succeed",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(DISK_FULL_CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");

    let report = verify(dir.path(), &key);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.records, 41);
    assert_eq!(report.last_seq, Some(41));
    assert_eq!(report.seals, 3);
    assert_eq!(report.unsealed, Some((34, 41)));
}

/// Writes the Python verifier from docs/audit.md to `dir` and returns it.
fn python_verifier(dir: &Path) -> PathBuf {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/audit.md");
    let text = fs::read_to_string(docs).unwrap();
    let start = text.find("```python\n").unwrap() + "```python\n".len();
    let end = start + text[start..].find("```").unwrap();
    let path = dir.join("verify_audit.py");
    fs::write(&path, &text[start..end]).unwrap();
    path
}

fn run_python(script: &Path, dir: &Path, key: &[u8; 32]) -> (i32, String) {
    let output = Command::new("python3")
        .arg(script)
        .arg(dir)
        .arg(hex::encode(key))
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    (output.status.code().unwrap(), stdout)
}

/// A change an intruder makes to the lines of a segment.
type Tamper = fn(&mut Vec<String>);

#[test]
fn documented_python_verifier_agrees() {
    let scripts = tempfile::tempdir().unwrap();
    let script = python_verifier(scripts.path());
    let dir = tempfile::tempdir().unwrap();
    let key = sealed_log(dir.path(), 25, 10);
    let (status, stdout) = run_python(&script, dir.path(), &key);
    assert_eq!(
        (status, stdout.as_str()),
        (0, "OK: records up to seq 27, last seal epoch 1\n")
    );

    let path = first_segment(dir.path());
    let original = read_lines(&path);
    let cases: [(&str, Tamper); 4] = [
        ("changed", |lines| {
            lines[4] = lines[4].replace("request number 5", "x")
        }),
        ("removed", |lines| {
            lines.remove(4);
        }),
        ("rechained", |lines| {
            lines[14] = lines[14].replace("request number 14", "x");
            rechain(lines, 14);
        }),
        ("cut", |lines| lines.truncate(11)),
    ];
    for (name, tamper) in cases {
        let mut lines = original.clone();
        tamper(&mut lines);
        write_lines(&path, &lines);
        let (seq, problem) = first_bad(dir.path(), &key);
        let (status, stdout) = run_python(&script, dir.path(), &key);
        assert_eq!(status, 1, "{name}: {stdout}");
        assert!(
            stdout.starts_with(&format!("record {seq}: ")),
            "{name}: python {stdout:?}, rust record {seq}: {problem}"
        );
    }
}
