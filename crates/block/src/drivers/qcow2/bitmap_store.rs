//! Persistent bitmaps in the image: loaded at open (in-use ones are inconsistent),
//! marked in use while the image is open for writing, stored on a clean close.

use super::Qcow2Driver;
use super::bitmaps;
use super::geometry::OFFSET_MASK;
use super::geometry::be_u64s;
use super::geometry::u64s_be;
use super::header;
use super::header::corrupt;
use crate::buf::IoBuf;
use crate::error::Result;
use crate::node::driver::WriteFlags;

impl Qcow2Driver {
    /// Loads the bitmaps of the extension (when the header says they are consistent);
    /// for writing, marks them in use on disk first.
    pub(super) async fn load_bitmaps(&self) -> Result<()> {
        let Some((nb, dir_size, dir_offset)) = self.header.bitmaps else {
            return Ok(());
        };
        if self.header.autoclear & header::AUTOCLEAR_BITMAPS == 0 {
            // Written by a program that did not maintain them: not trustworthy, and
            // QEMU ignores them too. A store replaces the extension.
            return Ok(());
        }
        let cs = self.geo.cluster_size;
        let file_len = self.file.length();
        bitmaps::check_directory(nb, dir_size, dir_offset, cs, file_len)?;
        let mut dir = self
            .file
            .read(dir_offset, IoBuf::zeroed(dir_size as usize))
            .await?
            .to_vec();
        let entries = bitmaps::parse_directory(&dir, nb)?;
        let mut used: Vec<u64> = (0..dir_size.div_ceil(cs))
            .map(|i| dir_offset + i * cs)
            .collect();
        let mut loaded = Vec::new();
        for e in &entries {
            let granularity = 1u64 << e.granularity_bits;
            let data_len = bitmaps::data_len(self.geo.size, granularity);
            // Before anything is allocated: the image says how big the bitmap is.
            bitmaps::check_size(e, self.geo.size, cs)?;
            if u64::from(e.table_size) != data_len.div_ceil(cs) {
                return Err(corrupt(format!(
                    "bitmap '{}' has a table of {} entries, expected {}",
                    e.name,
                    e.table_size,
                    data_len.div_ceil(cs)
                )));
            }
            let table_bytes = u64::from(e.table_size) * 8;
            if !e.table_offset.is_multiple_of(cs)
                || e.table_offset == 0
                || e.table_offset.saturating_add(table_bytes) > file_len
            {
                return Err(corrupt(format!(
                    "bitmap '{}' has its table outside the file",
                    e.name
                )));
            }
            used.extend((0..table_bytes.div_ceil(cs)).map(|i| e.table_offset + i * cs));
            let inconsistent = e.flags & bitmaps::FLAG_IN_USE != 0;
            if inconsistent {
                // Its bits cannot be trusted; like QEMU, do not load them.
                let bits = bitmap::Bitmap::new(self.geo.size, granularity)
                    .map_err(|err| corrupt(format!("bitmap '{}': {err}", e.name)))?;
                loaded.push(crate::dirty::PersistentBitmap {
                    name: e.name.clone(),
                    bits,
                    recording: false,
                    inconsistent: true,
                });
                continue;
            }
            let table = be_u64s(
                &self
                    .file
                    .read(e.table_offset, IoBuf::zeroed(table_bytes as usize))
                    .await?,
            );
            let mut bits = bitmap::Bitmap::new(self.geo.size, granularity)
                .map_err(|err| corrupt(format!("bitmap '{}': {err}", e.name)))?;
            for (i, &entry) in table.iter().enumerate() {
                let at = entry & OFFSET_MASK;
                let first_granule = i as u64 * cs * 8;
                let len = (data_len - i as u64 * cs).min(cs) as usize;
                if at == 0 {
                    if entry & 1 != 0 {
                        // An all-ones cluster: one range, not a cluster of 0xff bytes
                        // decoded bit by bit.
                        bitmaps::set_granules(&mut bits, first_granule, len as u64 * 8);
                    }
                    continue;
                }
                if !at.is_multiple_of(cs) || at + len as u64 > file_len {
                    return Err(corrupt(format!(
                        "bitmap '{}' has data outside the file",
                        e.name
                    )));
                }
                used.push(at);
                let data = self.file.read(at, IoBuf::zeroed(len)).await?;
                bitmaps::decode_into(&mut bits, &data, first_granule);
            }
            loaded.push(crate::dirty::PersistentBitmap {
                name: e.name.clone(),
                bits,
                recording: e.flags & bitmaps::FLAG_AUTO != 0,
                inconsistent: false,
            });
        }
        if !self.read_only {
            // In use from now until a clean close stores them again.
            for e in &entries {
                let flags = e.flags | bitmaps::FLAG_IN_USE;
                dir[e.flags_at..e.flags_at + 4].copy_from_slice(&flags.to_be_bytes());
            }
            self.write_file(dir_offset, IoBuf::from_slice(&dir), WriteFlags::default())
                .await?;
            self.sync_file().await?;
        }
        self.meta.lock().await.bitmap_dir = Some((dir_offset, dir_size, entries, used));
        *self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }

    /// Writes `list` as the image's bitmaps: data, tables and a new directory first,
    /// then the header switches to them, then the old ones are freed.
    pub(super) async fn store_bitmaps(
        &self,
        list: Vec<crate::dirty::PersistentBitmap>,
    ) -> Result<()> {
        if self.read_only || !self.geo.v3 {
            return Ok(());
        }
        let cs = self.geo.cluster_size;
        let mut m = self.meta.lock().await;
        if m.closed {
            return Ok(()); // stored when it was closed
        }
        if list.is_empty() && m.bitmap_dir.is_none() && self.header.bitmaps.is_none() {
            return Ok(());
        }
        let mut entries = Vec::new();
        let mut used = Vec::new();
        for b in &list {
            let data = bitmaps::encode_bits(&b.bits);
            let mut table = Vec::new();
            for chunk in data.chunks(cs as usize) {
                if chunk.iter().all(|&x| x == 0) {
                    table.push(0u64);
                    continue;
                }
                let at = self.alloc_clusters(&mut m, 1).await?;
                self.write_file(at, IoBuf::from_slice(chunk), WriteFlags::default())
                    .await?;
                used.push(at);
                table.push(at);
            }
            let table_bytes = u64s_be(&table);
            let n = (table_bytes.len() as u64).div_ceil(cs).max(1);
            let table_offset = self.alloc_clusters(&mut m, n).await?;
            self.write_file(
                table_offset,
                IoBuf::from_slice(&table_bytes),
                WriteFlags::default(),
            )
            .await?;
            used.extend((0..n).map(|i| table_offset + i * cs));
            entries.push(bitmaps::Entry {
                table_offset,
                table_size: table.len() as u32,
                flags: if b.recording { bitmaps::FLAG_AUTO } else { 0 }
                    | if b.inconsistent {
                        bitmaps::FLAG_IN_USE
                    } else {
                        0
                    },
                granularity_bits: b.bits.granularity().trailing_zeros() as u8,
                name: b.name.clone(),
                flags_at: 0,
            });
        }
        let mut new_dir = None;
        if !entries.is_empty() {
            let dir = bitmaps::encode_directory(&entries);
            let n = (dir.len() as u64).div_ceil(cs);
            let dir_offset = self.alloc_clusters(&mut m, n).await?;
            self.write_file(dir_offset, IoBuf::from_slice(&dir), WriteFlags::default())
                .await?;
            used.extend((0..n).map(|i| dir_offset + i * cs));
            new_dir = Some((dir_offset, dir.len() as u64));
        }
        // Everything new is counted and on disk before the header names it.
        self.flush_meta(&mut m).await?;
        self.sync_file().await?;
        let mut extensions: Vec<(u32, Vec<u8>)> = m
            .extensions
            .iter()
            .filter(|(kind, _)| *kind != header::EXT_BITMAPS)
            .cloned()
            .collect();
        if let Some((offset, size)) = new_dir {
            let mut data = Vec::with_capacity(24);
            data.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            data.extend_from_slice(&0u32.to_be_bytes());
            data.extend_from_slice(&size.to_be_bytes());
            data.extend_from_slice(&offset.to_be_bytes());
            extensions.push((header::EXT_BITMAPS, data));
        }
        let mut cluster0 = self
            .file
            .read(0, IoBuf::zeroed(cs as usize))
            .await?
            .to_vec();
        header::rewrite_extensions(
            &mut cluster0,
            self.header.header_length as usize,
            &extensions,
            m.backing_file.as_deref(),
        )?;
        let autoclear = if new_dir.is_some() {
            header::AUTOCLEAR_BITMAPS
        } else {
            0
        };
        cluster0[88..96].copy_from_slice(&autoclear.to_be_bytes());
        self.write_file(0, IoBuf::from_slice(&cluster0), WriteFlags::default())
            .await?;
        self.sync_file().await?;
        // The old directory, tables and data are unreferenced now.
        if let Some((_, _, _, old)) = m.bitmap_dir.take() {
            for at in old {
                m.pending_frees.push((at >> self.geo.cluster_bits, 1));
            }
        }
        m.extensions = extensions;
        m.bitmap_dir = new_dir.map(|(o, s)| (o, s, entries, used));
        self.flush_meta(&mut m).await
    }
}
