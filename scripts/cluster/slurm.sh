#!/usr/bin/env bash
# A single-node Slurm cluster on loopback, to try the sweep launcher locally and to test it (tests/test_cluster.py).
#
#   scripts/cluster/slurm.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf   (sbatch, squeue, sacct, ...)
#   scripts/cluster/slurm.sh stop DIR    # stops every daemon that `start DIR` started, by its pid
#
# Daemons: munged (authentication), MariaDB + slurmdbd (job accounting: submitit reads job states with
# sacct, so a cancelled job is seen as CANCELLED instead of waited on forever), slurmctld and slurmd.
# Everything they write (configs, state, spool, logs, sockets, pid files) stays in DIR; /etc is not touched,
# ports are free ones picked at start, so several clusters (or a system Slurm) can run side by side.
# The node has this machine's CPUs and memory and no GPUs: ask for none (hydra.launcher.gpus_per_node=null).
# Needs root (slurmd starts jobs as the submitting user) and Debian's packages:
#   apt-get install slurm-wlm slurmdbd munge mariadb-server
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

# ------------------------------------------------------------------------------------------ stop
# alive PID: running and not a zombie (an exited daemon whose parent has not reaped it yet)
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# SIGTERM each daemon by the pid recorded when it was started (newest first), SIGKILL after 20 s.
stop() {
  local name pid i
  # jobs first: their processes belong to slurmstepd, which outlives slurmd
  if [ -f "$dir/slurmctld.pid" ] && alive "$(cat "$dir/slurmctld.pid")"; then
    if [ -n "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %A 2>/dev/null)" ]; then
      SLURM_CONF="$dir/slurm.conf" scancel --full $(SLURM_CONF="$dir/slurm.conf" squeue -h -o %A) 2>/dev/null || true
      for i in $(seq 100); do
        [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      for i in $(seq 200); do alive "$pid" || break; sleep 0.1; done
      if alive "$pid"; then
        echo "slurm.sh: $name (pid $pid) did not stop in 20 s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$dir/$name.pid"
  done
}

if [ "$cmd" = stop ]; then stop; echo "slurm.sh: stopped the cluster in $dir"; exit 0; fi
[ "$cmd" = start ] || usage

# ------------------------------------------------------------------------------------------ start
missing=()
for b in munged munge unmunge mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sacct scontrol sinfo; do
  command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
export PATH="$PATH:/usr/sbin"
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm.sh: missing ${missing[*]}: apt-get install slurm-wlm slurmdbd munge mariadb-server" >&2
  exit 3
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "slurm.sh: must run as root (slurmd starts jobs as the user who submitted them)" >&2
  exit 3
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  if [ -f "$dir/$name.pid" ] && alive "$(cat "$dir/$name.pid")"; then
    echo "slurm.sh: a cluster is already running in $dir (stop it first: $0 stop $dir)" >&2
    exit 1
  fi
done

# a failed start leaves nothing running
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "slurm.sh: start failed, stopping what was started" >&2; stop; fi' EXIT

# run a daemon in the foreground, detached, and record its pid
launch() {  # NAME LOG CMD...
  local name=$1 log=$2; shift 2
  setsid "$@" >>"$log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

# wait until CMD succeeds; on time-out show the daemon's log
wait_for() {  # NAME LOG SECONDS CMD...
  local name=$1 log=$2 secs=$3 i; shift 3
  for i in $(seq $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! alive "$(cat "$dir/$name.pid")"; then
      echo "slurm.sh: $name exited; its log ($log):" >&2; tail -n 30 "$log" >&2; return 1
    fi
    sleep 0.2
  done
  echo "slurm.sh: $name not ready after ${secs} s; its log ($log):" >&2; tail -n 30 "$log" >&2
  return 1
}

read -r ctld_port slurmd_port dbd_port db_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$dir"/{state,spool,log,munge,mysql}
chmod 700 "$dir/munge"
chmod 711 "$dir"

# munged with its own key and socket (the system's /run/munge is left alone)
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
sock="$dir/munge/munge.socket"
launch munged "$dir/log/munged.out" munged --foreground --force --socket="$sock" \
  --key-file="$dir/munge/munge.key" --log-file="$dir/log/munged.log" \
  --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"
wait_for munged "$dir/log/munged.log" 20 bash -c "munge -n -S '$sock' | unmunge -S '$sock'"

# MariaDB for slurmdbd, on 127.0.0.1:$db_port
mariadb-install-db --no-defaults --user=root --datadir="$dir/mysql" --auth-root-authentication-method=socket \
  --skip-test-db >"$dir/log/mariadb-install.log" 2>&1 \
  || { echo "slurm.sh: mariadb-install-db failed:" >&2; tail -n 30 "$dir/log/mariadb-install.log" >&2; exit 1; }
launch mariadbd "$dir/log/mariadbd.log" mariadbd --no-defaults --user=root --datadir="$dir/mysql" \
  --bind-address=127.0.0.1 --port="$db_port" --socket="$dir/mysql.sock" --pid-file="$dir/mysql/mariadbd.pid" \
  --innodb-buffer-pool-size=64M --skip-name-resolve
wait_for mariadbd "$dir/log/mariadbd.log" 60 mariadb --no-defaults --socket="$dir/mysql.sock" -u root -e "select 1"
db_pass=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
mariadb --no-defaults --socket="$dir/mysql.sock" -u root -e \
  "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
PidFile=$dir/state/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
EOF
chmod 600 "$dir/slurmdbd.conf"

# Seen working with Debian's slurm-wlm 22.05 in a container: no cgroups, no systemd.
cat > "$dir/slurm.conf" <<EOF
ClusterName=flashlight
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/state/slurmctld.pid
SlurmdPidFile=$dir/state/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$sock
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$dir/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
EOF
export SLURM_CONF="$dir/slurm.conf"

launch slurmdbd "$dir/log/slurmdbd.log" slurmdbd -D   # reads slurmdbd.conf beside $SLURM_CONF
wait_for slurmdbd "$dir/log/slurmdbd.log" 60 \
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $dbd_port), 1)"
launch slurmctld "$dir/log/slurmctld.log" slurmctld -D -i -f "$dir/slurm.conf"
wait_for slurmctld "$dir/log/slurmctld.log" 60 bash -c "scontrol ping | grep -q UP"
launch slurmd "$dir/log/slurmd-$host.log" slurmd -D -f "$dir/slurm.conf"
wait_for slurmd "$dir/log/slurmd-$host.log" 60 bash -c "sinfo -h -o %T | grep -qx idle"
# job states must be readable from the accounting database (what submitit polls)
wait_for slurmdbd "$dir/log/slurmdbd.log" 30 sacct -n -X -S now

echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env.sh"
echo "slurm.sh: cluster up in $dir (node $host, $cpus CPUs, ${mem_mb} MB, partition debug, no GPUs)"
echo "  export SLURM_CONF=$dir/slurm.conf    # or: source $dir/env.sh"
echo "  stop:  $0 stop $dir"
