//! `null-co` / `null-aio`: a device of a given size that stores nothing.
//!
//! Writes succeed and vanish; reads leave the buffer as passed unless `read-zeroes` is
//! set (QEMU's behaviour: without it, reads cost nothing, which is what benchmarks of
//! the layers above want). `latency-ns` delays every request.

use std::time::Duration;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::error::Result;
use crate::node::driver::BlockDriver;
use crate::node::driver::Extent;
use crate::node::driver::Status;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;
use crate::options::NullOptions;

/// A null device.
#[derive(Debug)]
pub struct NullDriver {
    name: &'static str,
    size: u64,
    latency: Duration,
    read_zeroes: bool,
}

impl NullDriver {
    /// A null device from its options.
    pub fn new(options: &NullOptions) -> Self {
        Self {
            name: options.name,
            size: options.size,
            latency: Duration::from_nanos(options.latency_ns),
            read_zeroes: options.read_zeroes,
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

#[async_trait]
impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        self.name
    }

    fn length(&self) -> u64 {
        self.size
    }

    async fn read(&self, _offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        self.delay().await;
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(buf)
    }

    async fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        self.delay().await;
        Ok(buf)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        // Only with read-zeroes is it known what a read returns.
        let zero = self.read_zeroes;
        let status = Status {
            data: !zero,
            zero,
            allocated: true,
            host_offset: None,
            compressed: false,
        };
        Ok(Extent {
            offset,
            length: len,
            status,
        })
    }
}
