use super::*;

fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    File::create(&path).unwrap().set_len(len).unwrap();
    (dir, path)
}

fn pattern(len: usize, seed: u8) -> IoBuf {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    IoBuf::from_slice(&bytes)
}

/// Runs a scenario with buffered and with direct I/O.
macro_rules! both_cache_modes {
    ($name:ident, |$direct:ident| $body:block) => {
        mod $name {
            use super::*;
            async fn scenario($direct: bool) $body
            #[tokio::test]
            async fn buffered() {
                scenario(false).await;
            }
            #[tokio::test]
            async fn direct() {
                scenario(true).await;
            }
        }
    };
}

both_cache_modes!(written_data_reads_back_aligned_or_not, |direct| {
    let (_dir, path) = image(1 << 20);
    let file = FileDriver::open(&path, false, direct, false).unwrap();
    for (offset, len) in [(0u64, 4096usize), (8192, 65536), (12345, 777), (4095, 2)] {
        let data = pattern(len, offset as u8);
        file.write(offset, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        let back = file.read(offset, IoBuf::zeroed(len)).await.unwrap();
        assert_eq!(back, data, "offset {offset} len {len}");
    }
    file.flush().await.unwrap();
});

both_cache_modes!(uncached_reads_see_what_buffered_writes_wrote, |direct| {
    // The background pass of a backup reads with read_uncached right after guest writes
    // went through the other descriptor: it must see them, tail and all.
    let (_dir, path) = image((1 << 20) + 4097);
    let file = FileDriver::open(&path, false, direct, false).unwrap();
    for (offset, len) in [(0u64, 65536usize), (12345, 777), ((1 << 20) - 4096, 8193)] {
        let data = pattern(len, offset as u8 ^ 0x5a);
        file.write(offset, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        for past_cache in [false, true] {
            let back = file
                .read_uncached(offset, IoBuf::zeroed(len), past_cache)
                .await
                .unwrap();
            assert_eq!(back, data, "offset {offset} len {len} direct {past_cache}");
        }
    }
    // Past the file's end (the node is rounded up to sectors): zeros.
    let tail = file
        .read_uncached(file.length() - 512, IoBuf::zeroed(512), true)
        .await
        .unwrap();
    assert!(tail[1..].iter().all(|&b| b == 0));
    if !direct {
        // The aligned reads above went past the page cache (so the dirty pages they
        // found were written back first), wherever the filesystem takes O_DIRECT.
        let refused = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .is_err();
        assert_eq!(file.direct_reads.get().map(Option::is_some), Some(!refused));
    }
});

both_cache_modes!(the_unaligned_tail_of_a_4097_byte_file_works, |direct| {
    let (_dir, path) = image(4097);
    let file = FileDriver::open(&path, false, direct, false).unwrap();
    // QEMU's rule: the node is the file rounded up to whole sectors.
    assert_eq!(file.length(), 4608);
    file.write(
        4096,
        IoBuf::from_slice(&[0xab]),
        WriteFlags {
            fua: true,
            ..WriteFlags::default()
        },
    )
    .await
    .unwrap();
    let back = file.read(0, IoBuf::zeroed(4608)).await.unwrap();
    assert_eq!(back[4096], 0xab);
    assert!(back[..4096].iter().all(|b| *b == 0));
    assert!(
        back[4097..].iter().all(|b| *b == 0),
        "the tail reads as zeros"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        4097,
        "a write inside the file does not grow it"
    );
    // A write into the tail extends the file, as it does in QEMU.
    file.write(4600, IoBuf::from_slice(&[0xcd; 8]), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4608);
    assert_eq!(file.length(), 4608);
    let extent = file.block_status(4097, 511).await.unwrap();
    assert!(extent.length >= 1);
});

both_cache_modes!(requests_past_the_end_are_refused, |direct| {
    let (_dir, path) = image(8192);
    let file = FileDriver::open(&path, false, direct, false).unwrap();
    let err = file.read(8192, IoBuf::zeroed(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfBounds);
    assert!(err.to_string().contains("past the end"), "{err}");
    let err = file
        .write(4096, IoBuf::zeroed(8192), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfBounds);
    let err = file
        .write_zeroes(u64::MAX - 1, 4, ZeroFlags::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
    let err = file.discard(0, 8193).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfBounds);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
});

both_cache_modes!(block_status_separates_data_from_holes, |direct| {
    let (_dir, path) = image(1 << 20);
    let file = FileDriver::open(&path, false, direct, false).unwrap();
    file.write(256 << 10, pattern(64 << 10, 1), WriteFlags::default())
        .await
        .unwrap();
    file.flush().await.unwrap();

    let hole = file.block_status(0, 1 << 20).await.unwrap();
    assert_eq!((hole.offset, hole.length), (0, 256 << 10));
    assert!(hole.status.zero && !hole.status.data && hole.status.allocated);

    let data = file.block_status(256 << 10, 768 << 10).await.unwrap();
    assert_eq!(data.length, 64 << 10);
    assert!(data.status.data && !data.status.zero);
    assert_eq!(data.status.host_offset, Some(256 << 10));

    let tail = file.block_status(320 << 10, 704 << 10).await.unwrap();
    assert_eq!(tail.length, 704 << 10);
    assert!(tail.status.zero);

    let bounded = file.block_status(0, 4096).await.unwrap();
    assert_eq!(bounded.length, 4096, "a run is clipped to the request");
});

both_cache_modes!(
    write_zeroes_reads_back_zero_with_or_without_unmap,
    |direct| {
        let (_dir, path) = image(1 << 20);
        let file = FileDriver::open(&path, false, direct, false).unwrap();
        file.write(0, pattern(1 << 20, 9), WriteFlags::default())
            .await
            .unwrap();

        file.write_zeroes(
            64 << 10,
            64 << 10,
            ZeroFlags {
                may_unmap: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        file.write_zeroes(200 << 10, 100, ZeroFlags::default())
            .await
            .unwrap();
        let back = file.read(0, IoBuf::zeroed(1 << 20)).await.unwrap();
        let mut expected = pattern(1 << 20, 9);
        expected[64 << 10..128 << 10].fill(0);
        expected[200 << 10..(200 << 10) + 100].fill(0);
        assert_eq!(back, expected);

        let punched = file.block_status(64 << 10, 64 << 10).await.unwrap();
        assert!(
            punched.status.zero,
            "a punched range is a hole: {punched:?}"
        );
    }
);

#[tokio::test]
async fn discard_punches_a_hole() {
    let (_dir, path) = image(1 << 20);
    let file = FileDriver::open(&path, false, false, false).unwrap();
    file.write(0, pattern(1 << 20, 3), WriteFlags::default())
        .await
        .unwrap();
    file.discard(512 << 10, 256 << 10).await.unwrap();
    let status = file.block_status(512 << 10, 256 << 10).await.unwrap();
    assert!(status.status.zero);
    assert_eq!(status.length, 256 << 10);
}

#[tokio::test]
async fn read_only_files_refuse_writes() {
    let (_dir, path) = image(4096);
    let file = FileDriver::open(&path, true, false, false).unwrap();
    let err = file
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert_eq!(err.nbd_errno(), 1);
    let err = file
        .write_zeroes(0, 512, ZeroFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
}

#[test]
fn missing_files_and_directories_get_qemus_messages() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nosuch.img");
    let err = FileDriver::open(&missing, false, false, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(
        err.to_string(),
        format!(
            "Could not open '{}': No such file or directory",
            missing.display()
        )
    );
    let err = FileDriver::open(dir.path(), false, false, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Could not open '{}': Is a directory", dir.path().display())
    );
}

#[test]
fn a_fifo_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = FileDriver::open(&fifo, true, false, false).unwrap_err();
    assert!(err.to_string().contains("regular file"), "{err}");
}

#[tokio::test]
async fn small_reads_of_evicted_pages_skip_the_non_blocking_try() {
    // A small read tries the page cache on the async thread only where cachestat says
    // the cache holds the whole range; on a miss RWF_NOWAIT would still start readahead
    // there. Whatever the answer, the read returns the file's data.
    let (_dir, path) = image(1 << 20);
    let data = pattern(1 << 20, 7);
    std::fs::write(&path, &data[..]).unwrap();
    let std_file = File::open(&path).unwrap();
    assert!(cache_holds(&std_file, 0, 65536), "just written, so cached");
    if NO_CACHESTAT.load(Ordering::Relaxed) {
        eprintln!(
            "cachestat is missing here (Linux < 6.5, or a seccomp filter): small reads try RWF_NOWAIT"
        );
        return;
    }
    std_file.sync_all().unwrap();
    let fadvise = |advice| {
        // SAFETY: fadvise on a valid descriptor with integer arguments.
        let rc = unsafe { libc::posix_fadvise(std_file.as_raw_fd(), 0, 0, advice) };
        assert_eq!(rc, 0);
    };
    // The whole file: a large folio is dropped whole or not at all.
    fadvise(libc::POSIX_FADV_DONTNEED);
    // tmpfs keeps its pages: they are the file.
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs writes one struct into the live buffer.
    assert_eq!(unsafe { libc::statfs(c_path.as_ptr(), fs.as_mut_ptr()) }, 0);
    // SAFETY: statfs returned 0, so it filled the struct.
    let tmpfs = unsafe { fs.assume_init() }.f_type == libc::TMPFS_MAGIC;
    if !tmpfs {
        assert!(!cache_holds(&std_file, 0, 4096), "evicted");
        assert!(!cache_holds(&std_file, 4096, 65536), "evicted");
        // One page read back without readahead: cached there, not past it.
        fadvise(libc::POSIX_FADV_RANDOM);
        std_file.read_exact_at(&mut [0; 4096], 0).unwrap();
        assert!(cache_holds(&std_file, 0, 4096), "read back");
        assert!(!cache_holds(&std_file, 0, 1 << 20), "only partly read back");
    }
    let file = FileDriver::open(&path, true, false, false).unwrap();
    for (offset, len) in [
        (0u64, 4096usize),
        (16384, 32768),
        (32768, 4096),
        (100, 5000),
    ] {
        let back = file.read(offset, IoBuf::zeroed(len)).await.unwrap();
        assert_eq!(
            &back[..],
            &data[offset as usize..offset as usize + len],
            "offset {offset} len {len}"
        );
    }
}

#[tokio::test]
async fn small_reads_of_holes_still_try_the_cache_first() {
    // A hole is never in the page cache until read, yet reading it does no I/O, so a
    // small read of one tries RWF_NOWAIT on the async thread rather than paying the
    // pool's round trip. Data next to the hole is not mistaken for one.
    let (_dir, path) = image(1 << 20);
    let data = pattern(65536, 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&data, 512 << 10)
        .unwrap();
    let std_file = File::open(&path).unwrap();
    if lseek(&std_file, 0, libc::SEEK_DATA).ok() != Some(Some(512 << 10)) {
        eprintln!("this filesystem does not report holes: nothing to check");
        return;
    }
    assert!(is_hole(&std_file, 0, 4096));
    assert!(
        is_hole(&std_file, (512 << 10) - 4096, 4096),
        "ends where data starts"
    );
    assert!(
        !is_hole(&std_file, (512 << 10) - 4096, 8192),
        "runs into the data"
    );
    assert!(!is_hole(&std_file, 512 << 10, 4096), "data");
    assert!(
        is_hole(&std_file, (576 << 10) + 4096, 4096),
        "the hole after the data"
    );
    let file = FileDriver::open(&path, true, false, false).unwrap();
    for (offset, len) in [
        (0u64, 4096usize),
        ((512 << 10) - 4096, 8192),
        (600 << 10, 4096),
    ] {
        let back = file.read(offset, IoBuf::zeroed(len)).await.unwrap();
        let want: Vec<u8> = (offset..offset + len as u64)
            .map(|at| {
                let rel = at.wrapping_sub(512 << 10);
                if rel < 65536 { data[rel as usize] } else { 0 }
            })
            .collect();
        assert_eq!(&back[..], &want[..], "offset {offset} len {len}");
    }
}

#[tokio::test]
async fn uncached_writes_read_back_through_the_page_cache_too() {
    // Aligned uncached writes of a buffered file go through a second, O_DIRECT
    // descriptor; the rest, and every write where O_DIRECT is refused, go through the
    // page cache. Either way every read sees the last write, cached pages included.
    let (_dir, path) = image(1 << 20);
    let file = FileDriver::open(&path, false, false, false).unwrap();
    let uncached = WriteFlags {
        uncached: true,
        ..WriteFlags::default()
    };
    let mut model = vec![0u8; 1 << 20];
    let apply = |model: &mut Vec<u8>, offset: usize, buf: &IoBuf| {
        model[offset..offset + buf.len()].copy_from_slice(buf);
    };
    let first = pattern(65536, 1);
    apply(&mut model, 0, &first);
    file.write(0, first, WriteFlags::default()).await.unwrap();
    // Into the cache, so a stale page would show below.
    file.read(0, IoBuf::zeroed(65536)).await.unwrap();
    for (offset, len, seed) in [
        (4096usize, 32768usize, 2u8),
        (100, 5000, 3),
        (65536, 4096, 4),
        (8192, 4096, 5),
    ] {
        let buf = pattern(len, seed);
        apply(&mut model, offset, &buf);
        file.write(offset as u64, buf, uncached).await.unwrap();
        let back = file.read(0, IoBuf::zeroed(1 << 20)).await.unwrap();
        assert_eq!(&back[..], &model[..], "after offset {offset} len {len}");
    }
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .is_err();
    assert_eq!(
        file.direct_writes.get().map(Option::is_some),
        Some(!refused),
        "the O_DIRECT descriptor is there exactly where the filesystem takes O_DIRECT"
    );
    file.flush().await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);
}

#[test]
fn asynchronous_direct_reads_see_dirty_pages_and_zeros_past_the_end() {
    // What the background pass relies on when it reads through io_uring: the read
    // sees writes still dirty in the page cache, fills past the file's end with
    // zeros, and leaves the buffer alone where io_uring is missing.
    let (_dir, path) = image((1 << 20) + 4096);
    let buffered = OpenOptions::new().write(true).open(&path).unwrap();
    let data = pattern(1 << 20, 7);
    buffered.write_all_at(&data, 4096).unwrap();
    let Ok(direct) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    else {
        eprintln!("no O_DIRECT on this filesystem: nothing to read with");
        return;
    };
    let marked = IoBuf::from_slice(&vec![0xee; 8192]);
    match async_direct::read_full(&direct, IoBuf::zeroed(1 << 20), 4096) {
        Ok((back, result)) => {
            result.unwrap();
            assert_eq!(back, data, "the dirty pages were written back first");
            assert!(async_direct::available());
            // The last page of the file and one past its end.
            let (tail, result) = async_direct::read_full(&direct, marked, 1 << 20).unwrap();
            result.unwrap();
            assert_eq!(&tail[..4096], &data[data.len() - 4096..]);
            assert!(tail[4096..].iter().all(|&b| b == 0), "zeros past the end");
        }
        Err(back) => {
            assert!(
                !async_direct::available(),
                "handed back only when unavailable"
            );
            assert!(back.is_zero(), "the buffer comes back untouched");
        }
    }
}
