//! Opening an image file from the command line: format probing and the node graph.

use std::io::Read;
use std::path::Path;

use block::AttachUser;
use block::Attachment;
use block::BlockdevOptions;
use block::NodeGraph;
use block::options::BackingRef;
use block::options::BlockdevRef;
use block::options::DriverOptions;
use block::options::FileOptions;
use block::options::Qcow2Options;

/// Image formats the CLI knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write, versions 2 and 3.
    Qcow2,
}

/// qcow2 header magic, "QFI\xfb" (qcow2 spec, "Header").
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Guesses the format from the first bytes, as qemu-img does: qcow2 by its magic,
/// anything else is raw.
pub fn probe(path: &Path) -> anyhow::Result<Format> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("Could not open '{}': {}", path.display(), os_text(&e)))?;
    let mut magic = [0u8; 4];
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Directories fail here with EISDIR; let the driver word the error.
            Err(_) => return Ok(Format::Raw),
        }
    }
    Ok(if read == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

pub fn os_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_string()
}

/// Node options for an image file in `format`, named `name` (generated when None).
pub fn node_options(
    path: &Path,
    format: Format,
    read_only: bool,
    name: Option<&str>,
) -> BlockdevOptions {
    let mut options = match format {
        Format::Raw => BlockdevOptions::raw_file(path, read_only),
        Format::Qcow2 => {
            let file = BlockdevOptions::plain(DriverOptions::File(FileOptions {
                filename: path.to_path_buf(),
            }));
            let mut options = BlockdevOptions::plain(DriverOptions::Qcow2(Qcow2Options {
                file: BlockdevRef::Inline(Box::new(file)),
                backing: BackingRef::FromHeader,
                l2_cache_size: None,
            }));
            options.read_only = Some(read_only);
            options
        }
    };
    options.node_name = name.map(str::to_string);
    if !read_only {
        options.discard = Some(block::options::DiscardMode::Unmap);
    }
    options
}

/// An image opened read-only for inspection.
pub struct OpenImage {
    /// The inspector's handle on the format node (it keeps the node chain alive).
    pub node: Attachment,
    /// The format it was opened as.
    pub format: Format,
}

/// Opens `path` read-only as `format` (probed when `None`).
pub async fn open_read_only(path: &Path, format: Option<Format>) -> anyhow::Result<OpenImage> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let graph = NodeGraph::new();
    let top = graph.open(node_options(path, format, true, None)).await?;
    let node = graph.attach(top.name(), AttachUser::Other("command line".into()))?;
    Ok(OpenImage { node, format })
}
