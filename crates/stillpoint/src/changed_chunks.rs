//! Chunks of an incremental backup handed to the snapshot writer with what changed in
//! them: the runs of each chunk the dirty bitmap marks, over the parent snapshot's
//! chunk there, so a chunk changed in part is stored as a delta of its parent's
//! ([`SnapshotWriter::add_changed_at`]). Used by the daemon's `repository` node and by
//! `stillpoint backup --bitmap`.

use block::IoBuf;
use repo::ChunkId;
use repo::repository::SnapshotWriter;

/// Hands over the chunks of `data` from position `first` on: each that `changed`
/// marks in part, and whose parent chunk (`parent`, the parent snapshot's ids) is
/// stored, with its runs; the rest as they are.
pub fn add(
    writer: &mut SnapshotWriter,
    parent: &[ChunkId],
    chunk_size: usize,
    changed: &bitmap::Bitmap,
    first: u64,
    data: IoBuf,
) -> repo::Result<()> {
    let runs: Vec<Option<Vec<(u32, u32)>>> = data
        .chunks(chunk_size)
        .enumerate()
        .map(|(n, chunk)| {
            let index = first as usize + n;
            let base = parent.get(index).copied()?;
            let runs = changed_runs(changed, (index * chunk_size) as u64, chunk.len() as u64);
            let covered: u64 = runs.iter().map(|&(_, n)| u64::from(n)).sum();
            (base != ChunkId::ZERO && !runs.is_empty() && covered < chunk.len() as u64)
                .then_some(runs)
        })
        .collect();
    if runs.iter().all(Option::is_none) {
        return writer.add_at(first, data);
    }
    for (n, (chunk, runs)) in data.chunks(chunk_size).zip(runs).enumerate() {
        let index = first + n as u64;
        let chunk = IoBuf::from_slice(chunk);
        match runs {
            Some(runs) => writer.add_changed_at(index, chunk, parent[index as usize], runs)?,
            None => writer.add_at(index, chunk)?,
        }
    }
    Ok(())
}

/// The runs `changed` marks in `len` bytes at `start`, relative to `start`.
fn changed_runs(changed: &bitmap::Bitmap, start: u64, len: u64) -> Vec<(u32, u32)> {
    let end = start + len;
    let mut runs = Vec::new();
    let mut from = start;
    while from < end {
        let Some((at, n)) = changed.next_dirty_area(from, end - from) else {
            break;
        };
        if at >= end {
            break;
        }
        let run_end = (at + n).min(end);
        runs.push(((at - start) as u32, (run_end - at) as u32));
        from = run_end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_the_marked_bytes_of_one_chunk_clipped_to_it() {
        let mut bits = bitmap::Bitmap::new(1 << 20, 64 << 10).unwrap();
        bits.set(0, 1);
        bits.set(192 << 10, 128 << 10);
        bits.set(1000 << 10, 1);
        assert_eq!(
            changed_runs(&bits, 0, 256 << 10),
            vec![(0, 64 << 10), (192 << 10, 64 << 10)]
        );
        assert_eq!(
            changed_runs(&bits, 256 << 10, 256 << 10),
            vec![(0, 64 << 10)]
        );
        assert_eq!(changed_runs(&bits, 512 << 10, 256 << 10), vec![]);
        // The last chunk, short: clipped to the disk.
        assert_eq!(
            changed_runs(&bits, 960 << 10, 64 << 10),
            vec![(0, 64 << 10)]
        );
    }
}
