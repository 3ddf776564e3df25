//! The copy granularity, one rule for backups and standalone copy-before-write nodes:
//! QEMU's 64 KiB default, or the target's own cluster if larger (a partial-cluster
//! write would make the target copy on write), or the caller's `min-cluster-size`,
//! which may not exceed 1 GiB.

/// The smallest job cluster (QEMU's default backup granularity).
pub const MIN_CLUSTER_SIZE: u64 = 64 << 10;

/// The largest copy granularity accepted. A copy-before-write holds every cluster it
/// saves in memory at once; QEMU takes any power of two, and a cluster near the
/// device's size would make one guest write allocate that much (and could abort the
/// daemon), so larger values are refused.
pub const MAX_CLUSTER_SIZE: u64 = 1 << 30;

/// Refuses a `min-cluster-size` above [`MAX_CLUSTER_SIZE`].
pub fn check_min_cluster_size(min_cluster: u64) -> Result<(), String> {
    if min_cluster > MAX_CLUSTER_SIZE {
        return Err(format!(
            "min-cluster-size must be at most {MAX_CLUSTER_SIZE} (1 GiB): every \
             copy-before-write holds a whole cluster in memory"
        ));
    }
    Ok(())
}

/// The copy granularity for a target: QEMU's default, the target's own cluster if
/// larger (a partial-cluster write would make it copy on write), or the caller's
/// minimum. Shared by backups and standalone copy-before-write nodes.
pub fn copy_cluster_size(target: block::Limits, min_cluster: u64) -> u64 {
    let target_cluster = u64::from(target.cluster_size.unwrap_or(0));
    MIN_CLUSTER_SIZE.max(target_cluster).max(min_cluster)
}
