//! CPU topology: which cores exist and which NUMA node each belongs to, from hwloc (through the
//! hwlocality crate), falling back to /sys when hwloc cannot load a topology.

#[cfg(feature = "hwloc")]
use hwlocality::object::types::ObjectType;
#[cfg(feature = "hwloc")]
use hwlocality::Topology as HwlocTopology;

/// One logical CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Cpu {
    /// OS index (what `--cores` names and core_affinity pins to).
    pub cpu: usize,
    /// NUMA node.
    pub numa_node: usize,
}

/// The machine's CPUs.
#[derive(Debug, Clone)]
pub struct Topology {
    /// CPUs by OS index.
    pub cpus: Vec<Cpu>,
    /// Where the information came from ("hwloc" or "sysfs").
    pub source: &'static str,
}

impl Topology {
    /// Reads the topology from hwloc, or /sys if hwloc fails.
    pub fn detect() -> Self {
        match from_hwloc() {
            Some(cpus) if !cpus.is_empty() => Self {
                cpus,
                source: "hwloc",
            },
            _ => Self {
                cpus: from_sysfs(),
                source: "sysfs",
            },
        }
    }

    /// NUMA node of `cpu` (0 when unknown).
    pub fn numa_node_of(&self, cpu: usize) -> usize {
        self.cpus
            .iter()
            .find(|c| c.cpu == cpu)
            .map_or(0, |c| c.numa_node)
    }

    /// True when `cpu` exists.
    pub fn has_cpu(&self, cpu: usize) -> bool {
        self.cpus.iter().any(|c| c.cpu == cpu)
    }
}

#[cfg(not(feature = "hwloc"))]
fn from_hwloc() -> Option<Vec<Cpu>> {
    None
}

#[cfg(feature = "hwloc")]
fn from_hwloc() -> Option<Vec<Cpu>> {
    let topo = HwlocTopology::new().ok()?;
    let mut cpus: Vec<Cpu> = topo
        .objects_with_type(ObjectType::PU)
        .filter_map(|pu| {
            let cpu = pu.os_index()?;
            let numa_node = pu
                .nodeset()
                .and_then(|ns| ns.first_set())
                .map_or(0, usize::from);
            Some(Cpu { cpu, numa_node })
        })
        .collect();
    cpus.sort_by_key(|c| c.cpu);
    Some(cpus)
}

fn from_sysfs() -> Vec<Cpu> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut cpus: Vec<Cpu> = parse_cpu_list(online.trim())
        .unwrap_or_else(|_| (0..num_cpus_fallback()).collect())
        .into_iter()
        .map(|cpu| Cpu {
            cpu,
            numa_node: sysfs_node_of(cpu),
        })
        .collect();
    cpus.sort_by_key(|c| c.cpu);
    cpus
}

fn num_cpus_fallback() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn sysfs_node_of(cpu: usize) -> usize {
    let dir = format!("/sys/devices/system/cpu/cpu{cpu}");
    std::fs::read_dir(dir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
                .next()
        })
        .unwrap_or(0)
}

/// Parses a CPU list such as `0-3,6,8-9` (the format of `--cores` and of sysfs).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad core list element '{part}'");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("empty core list".into());
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = out.iter().find(|c| !seen.insert(**c)) {
        return Err(format!("core {dup} given twice"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_reject() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("1,1").is_err());
    }

    #[test]
    fn topology_lists_this_machines_cpus() {
        let t = Topology::detect();
        let n = std::thread::available_parallelism().unwrap().get();
        assert!(t.cpus.len() >= n, "{} cpus from {}", t.cpus.len(), t.source);
        assert!(t.has_cpu(0));
    }
}
