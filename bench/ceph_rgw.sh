#!/usr/bin/env bash
# A single-node Ceph (Debian's 16.2) with an S3 gateway on 127.0.0.1, for the S3
# benchmark (bench/s3_vs_local.py --endpoint): one monitor, one OSD on memstore (in
# memory, MEMSTORE_GIB GiB, 8 by default), one radosgw; cephx on, v2 messenger only, no
# systemd, no ceph-mgr. Not for the tests: it takes about half a minute to come up.
#
#   bash bench/ceph_rgw.sh start DIR   # installs the packages if missing (root), prints the endpoint
#   bash bench/ceph_rgw.sh stop DIR
#
# The S3 user is CEPHACCESSKEY / CEPHSECRETKEY0123456789 (s3_vs_local.py's defaults).
set -euo pipefail

action=${1:?start or stop}
dir=${2:?a directory for the cluster}
port=${RGW_PORT:-7480}

stop() {
  for daemon in rgw osd mon; do
    if [ -f "$dir/$daemon.pid" ]; then
      kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
    fi
  done
  for daemon in rgw osd mon; do
    if [ -f "$dir/$daemon.pid" ]; then
      pid=$(cat "$dir/$daemon.pid")
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$daemon.pid"
    fi
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi

if ! command -v radosgw >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    ceph-mon ceph-osd radosgw ceph-common uuid-runtime >/dev/null
fi

rm -rf "$dir"
mkdir -p "$dir"/{run,log,mon,osd,rgw}
dir=$(cd "$dir" && pwd)
fsid=$(uuidgen)
conf=$dir/ceph.conf
cat > "$conf" <<CONF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:3300
mon_initial_members = a
public_network = 127.0.0.0/8
ms_bind_msgr1 = false
keyring = $dir/\$name.keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
run_dir = $dir/run
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
mon_data = $dir/mon/\$name
osd_data = $dir/osd/\$name
osd_objectstore = memstore
memstore_device_bytes = $(( ${MEMSTORE_GIB:-8} << 30 ))
[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:$port
rgw_data = $dir/rgw
CONF

ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
monmaptool --create --addv a '[v2:127.0.0.1:3300]' --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
ceph-mon -c "$conf" -i a -f > "$dir/log/mon-stdout.log" 2>&1 &
echo $! > "$dir/mon.pid"
for _ in $(seq 1 100); do ceph -c "$conf" --connect-timeout 2 mon stat >/dev/null 2>&1 && break; sleep 0.2; done

osd_uuid=$(uuidgen)
osd_id=$(ceph -c "$conf" osd new "$osd_uuid")
mkdir -p "$dir/osd/osd.$osd_id"
ceph -c "$conf" auth get-or-create "osd.$osd_id" mon 'allow profile osd' osd 'allow *' \
  mgr 'allow profile osd' -o "$dir/osd.$osd_id.keyring"
ceph-osd -c "$conf" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1
ceph-osd -c "$conf" -i "$osd_id" -f > "$dir/log/osd-stdout.log" 2>&1 &
echo $! > "$dir/osd.pid"

ceph -c "$conf" auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' \
  -o "$dir/client.rgw.a.keyring"
radosgw -c "$conf" -n client.rgw.a -f > "$dir/log/rgw-stdout.log" 2>&1 &
echo $! > "$dir/rgw.pid"
# radosgw creates its pools, then listens.
for _ in $(seq 1 300); do
  curl -s -o /dev/null "http://127.0.0.1:$port/" && break
  sleep 0.2
done
radosgw-admin -c "$conf" user create --uid=bench --display-name=bench \
  --access-key=CEPHACCESSKEY --secret-key=CEPHSECRETKEY0123456789 >/dev/null
echo "http://127.0.0.1:$port"
