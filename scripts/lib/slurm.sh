# A one-node Slurm cluster on this machine for the Slurm executor's tests: Debian's slurm-wlm
# (slurmctld, slurmd) and munge, configured under target/slurm, started if not running.
# Exports SLURM_CONF. Needs root (munge runs as its user; slurmd as root). stop_slurm stops the
# daemons this shell started (a cluster that was already running is left alone).

SLURM_STARTED=()

ensure_slurm() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        [ "$(id -u)" = 0 ] || { echo "error: slurm-wlm and munge are missing and installing them needs root" >&2; exit 1; }
        echo "installing slurm-wlm and munge ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null ||
            { echo "error: apt-get could not install slurm-wlm and munge" >&2; exit 1; }
    fi
    local dir host cpus mem
    dir="$(pwd)/target/slurm"
    host="$(hostname -s)"
    # The tests' jobs are sleeps and tiny trainers: declare more CPUs than the machine has
    # (config_overrides), so that concurrent tests' jobs do not queue behind each other.
    cpus=32
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    export SLURM_CONF="$dir/slurm.conf"
    cat > "$SLURM_CONF.new" <<CONF
ClusterName=flywheel-test
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    if ! cmp -s "$SLURM_CONF.new" "$SLURM_CONF"; then
        mv "$SLURM_CONF.new" "$SLURM_CONF"
        # A changed configuration needs the daemons restarted on it.
        pkill -x slurmctld 2>/dev/null || true
        pkill -x slurmd 2>/dev/null || true
        local w
        for w in $(seq 1 50); do
            pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
            sleep 0.1
        done
    else
        rm -f "$SLURM_CONF.new"
    fi
    # munge: its key, and its directories owned by its user.
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
        [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
        chmod 0700 /etc/munge /var/lib/munge /var/log/munge
        chmod 0400 /etc/munge/munge.key
        chmod 0755 /run/munge
        su -s /bin/sh munge -c munged || { echo "error: munged did not start" >&2; exit 1; }
        SLURM_STARTED+=(munged)
    fi
    if ! pgrep -x slurmctld >/dev/null; then
        slurmctld -f "$SLURM_CONF" ||
            { echo "error: slurmctld did not start (log: $dir/log/slurmctld.log)" >&2; exit 1; }
        SLURM_STARTED+=(slurmctld)
    fi
    if ! pgrep -x slurmd >/dev/null; then
        slurmd -f "$SLURM_CONF" ||
            { echo "error: slurmd did not start (log: $dir/log/slurmd.log)" >&2; exit 1; }
        SLURM_STARTED+=(slurmd)
    fi
    local i
    for i in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return 0
        fi
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    echo "error: the Slurm node did not become idle: $(sinfo 2>&1 | tail -n +2) (logs in $dir/log)" >&2
    exit 1
}

stop_slurm() {
    local d
    for d in "${SLURM_STARTED[@]}"; do
        pkill -x "$d" 2>/dev/null || true
    done
    SLURM_STARTED=()
}
