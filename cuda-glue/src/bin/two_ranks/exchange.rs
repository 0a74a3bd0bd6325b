//! How the ranks of `segment-registry-two-ranks` meet: files in a shared
//! folder, written atomically and polled for, and rank 0's NCCL unique ids
//! handed to the other ranks through one of them.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use segment_registry_nccl::real::{RealBackend, UniqueId};

use crate::workload::COMMS;

const ID_FILE: &str = "nccl-unique-ids";
const ID_MAGIC: &str = "segment-registry-two-ranks nccl ids v1";
const POLL: Duration = Duration::from_millis(50);

/// Writes `text` to `path` atomically (a temporary file, then a rename):
/// a reader polling for `path` never sees it half written.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}

/// Polls for `path` until `deadline`; gives up early if the rank that
/// should write it reports a failure in `peer_status`.
pub(crate) fn wait_for_file(
    path: &Path,
    deadline: Instant,
    what: &str,
    peer_status: Option<&Path>,
) -> Result<String, String> {
    loop {
        match fs::read_to_string(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
        if let Some(st) = peer_status.and_then(|p| fs::read_to_string(p).ok()) {
            if st.starts_with("failed") {
                return Err(format!("gave up waiting for {what}: {}", st.trim()));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what} ({})", path.display()));
        }
        thread::sleep(POLL);
    }
}

/// The id file: magic, world size, one hex id per comm.
fn format_ids(world: usize, ids: &[UniqueId]) -> String {
    let mut s = format!("{ID_MAGIC}\nworld_size={world}\n");
    for id in ids {
        s.push_str(&id.to_hex());
        s.push('\n');
    }
    s
}

fn parse_ids(text: &str, world: usize, count: usize) -> Result<Vec<UniqueId>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(ID_MAGIC) {
        return Err("the id file does not start with the expected header".into());
    }
    let w = lines.next().unwrap_or_default();
    if w != format!("world_size={world}") {
        return Err(format!(
            "the id file is for another job ({w:?}, this one has world_size={world})"
        ));
    }
    let ids = lines
        .map(|l| UniqueId::from_hex(l).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != count {
        return Err(format!(
            "the id file holds {} ids, expected {count}",
            ids.len()
        ));
    }
    Ok(ids)
}

/// Rank 0 makes one unique id per comm and publishes them; the other ranks
/// poll for them.
pub(crate) fn exchange_ids(
    dir: &Path,
    (rank, world): (usize, usize),
    b: &RealBackend,
    deadline: Instant,
) -> Result<Vec<UniqueId>, String> {
    let path = dir.join(ID_FILE);
    if rank == 0 {
        if path.exists() {
            return Err(format!(
                "{} exists: a stale id from an earlier run; use a fresh --dir",
                path.display()
            ));
        }
        let ids = (0..COMMS.len())
            .map(|_| b.unique_id())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        write_atomic(&path, &format_ids(world, &ids))?;
        Ok(ids)
    } else {
        let text = wait_for_file(
            &path,
            deadline,
            "rank 0's NCCL unique ids",
            Some(&dir.join("status.rank0")),
        )?;
        parse_ids(&text, world, COMMS.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_file_round_trip_and_refusals() {
        let ids = [UniqueId([7; 128]), UniqueId([0xa5; 128])];
        let text = format_ids(2, &ids);
        assert_eq!(parse_ids(&text, 2, 2).unwrap(), ids);
        assert!(parse_ids(&text, 3, 2).unwrap_err().contains("another job"));
        assert!(parse_ids(&text, 2, 3).unwrap_err().contains("holds 2 ids"));
        assert!(parse_ids("garbage", 2, 2).is_err());
        let bad = text.replace("a5a5", "zz");
        assert!(parse_ids(&bad, 2, 2).is_err());
    }

    #[test]
    fn waiting_for_a_missing_file_times_out() {
        let dir = std::env::temp_dir().join(format!("segreg-two-ranks-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("never");
        let t = Instant::now();
        let soon = Instant::now() + Duration::from_millis(200);
        let e = wait_for_file(&p, soon, "x", None).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // A peer that reports a failure ends the wait at once.
        let peer = dir.join("status.peer");
        write_atomic(&peer, "failed: no GPU\n").unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let e = wait_for_file(&p, far, "x", Some(&peer)).unwrap_err();
        assert!(e.contains("no GPU"), "{e}");
        write_atomic(&p, "hello").unwrap();
        assert_eq!(
            wait_for_file(&p, Instant::now(), "x", None).unwrap(),
            "hello"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
