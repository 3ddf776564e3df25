//! Opening an image file from the command line: format probing and the node graph.
//!
//! # A probed format is not trusted
//!
//! A guest owns every byte of its raw disk, sector 0 included, so a guest can make its
//! disk *look* like a qcow2 image whose backing file is any host path (`/etc/shadow`).
//! Opening such a disk as qcow2 because its first bytes say so would read that host
//! file into a backup or serve it over NBD: QEMU's oldest image-format hole. So:
//!
//! * a probed qcow2 image that names a backing file or an external data file is
//!   refused, with a message that names the flag giving the format explicitly;
//! * a probed raw image refuses writes that would put a qcow2 header into its first
//!   sector (QEMU's rule; see the `raw` driver);
//! * a format given on the command line is trusted, and a backing chain is followed
//!   the way its headers say.

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

/// An image's format and whether it was guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFormat {
    /// The format.
    pub format: Format,
    /// Guessed from the first bytes, not given by the user.
    pub probed: bool,
}

impl ImageFormat {
    /// A format the user gave (or a command implies).
    pub fn given(format: Format) -> Self {
        Self {
            format,
            probed: false,
        }
    }
}

/// The format of `path`: `given`, or probed. A probed qcow2 image may not name a
/// backing or data file (see the module note); `flag` is the option that gives the
/// format explicitly, for the message.
pub fn resolve_format(
    path: &Path,
    given: Option<Format>,
    flag: &str,
) -> anyhow::Result<ImageFormat> {
    if let Some(format) = given {
        return Ok(ImageFormat::given(format));
    }
    let format = probe(path)?;
    if format == Format::Qcow2
        && let Some(header) = block::drivers::qcow2::read_file_header(path)?
    {
        let names = match (
            &header.backing_file,
            header.incompatible & block::drivers::qcow2::header::INCOMPAT_DATA_FILE != 0,
        ) {
            (Some(backing), _) => Some(format!("backing file '{backing}'")),
            (None, true) => Some("an external data file".to_string()),
            (None, false) => None,
        };
        if let Some(names) = names {
            anyhow::bail!(
                "'{}' looks like a qcow2 image with {names}, but its format was only \
                 probed: a probed image never opens a backing or data file (a guest can \
                 write such a header into its raw disk). If it is a qcow2 image, say so \
                 with {flag} qcow2; if it is a guest's raw disk, with {flag} raw",
                path.display()
            );
        }
    }
    Ok(ImageFormat {
        format,
        probed: true,
    })
}

/// Guesses the format from the first bytes, as qemu-img does: qcow2 by its magic,
/// anything else is raw. Callers that open the image use [`resolve_format`].
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
    block::error::os_error_text(e)
}

/// Node options for an image file in `format`, named `name` (generated when None).
pub fn node_options(
    path: &Path,
    format: ImageFormat,
    read_only: bool,
    name: Option<&str>,
) -> BlockdevOptions {
    let mut options = match format.format {
        Format::Raw => {
            let mut options = BlockdevOptions::raw_file(path, read_only);
            if let DriverOptions::Raw(raw) = &mut options.driver {
                raw.probed = format.probed;
            }
            options
        }
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

/// Opens `path` read-only as `format` (probed when `None`, under the probing rules).
pub async fn open_read_only(path: &Path, format: Option<Format>) -> anyhow::Result<OpenImage> {
    let format = resolve_format(path, format, "--format")?;
    let graph = NodeGraph::new();
    let top = graph.open(node_options(path, format, true, None)).await?;
    let node = graph.attach(top.name(), AttachUser::Other("command line".into()))?;
    Ok(OpenImage {
        node,
        format: format.format,
    })
}
