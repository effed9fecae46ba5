//! The controller: its admin queue connected and the controller enabled (CC.EN, Identify, the
//! number of I/O queues, the namespaces), kept alive by a small thread sending Keep Alive every
//! half KATO and shutting the controller down (CC.SHN) when the last handle goes. It hands out
//! I/O queue ids and connects the [`IoQueue`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{io, HostOptions, IoQueue, NvmfError, SyncQueue};
use crate::nvme::spec::{self, Command, IdentifyController, IdentifyNamespace};
use crate::nvmf::fabrics::{self, FabricsIdentity, CNTLID_DYNAMIC};

/// Keep Alive Timeout the host asks for.
const KATO_MS: u32 = 10_000;
/// Entries of the admin queue.
const ADMIN_QUEUE: u16 = 32;
/// Largest transfer of one command this initiator issues.
const MAX_CMD_BYTES: usize = 128 << 10;

/// A namespace of a remote controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Its id.
    pub nsid: u32,
    /// Blocks.
    pub blocks: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Write protected.
    pub read_only: bool,
}

/// A controller whose admin queue is up and kept alive.
pub struct HostController {
    pub(super) opts: HostOptions,
    cntlid: u16,
    /// Bytes of write data a command capsule takes.
    pub(super) in_capsule: usize,
    /// Largest transfer of one command.
    pub(super) max_cmd_bytes: usize,
    namespaces: Vec<Namespace>,
    identify: IdentifyController,
    free_qids: Mutex<Vec<u16>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for HostController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostController({} at {})",
            self.opts.subnqn,
            self.opts.addr()
        )
    }
}

impl HostController {
    /// Connects the admin queue, enables the controller, reads its identity and namespaces,
    /// asks for I/O queues and starts the keep-alive thread.
    pub fn connect(opts: HostOptions) -> Result<Arc<Self>, NvmfError> {
        let (mut admin, cntlid) =
            SyncQueue::connect(&opts, 0, ADMIN_QUEUE, CNTLID_DYNAMIC, KATO_MS)?;
        let (cap, _) = admin.command("Property Get CAP", fabrics::property_get(0, true), &[], 0)?;
        let caps = spec::Capabilities::parse(cap.result as u64);
        admin.command(
            "Property Set CC",
            fabrics::property_set(spec::REG_CC as u32, spec::cc_enable()),
            &[],
            0,
        )?;
        let end = Instant::now() + Duration::from_millis(caps.timeout_ms.max(500));
        loop {
            let (csts, _) = admin.command(
                "Property Get CSTS",
                fabrics::property_get(spec::REG_CSTS as u32, false),
                &[],
                0,
            )?;
            if csts.result & spec::CSTS_CFS != 0 {
                return Err(NvmfError::Unusable(
                    "the controller reports a fatal status".into(),
                ));
            }
            if csts.result & spec::CSTS_RDY != 0 {
                break;
            }
            if Instant::now() > end {
                return Err(NvmfError::Unusable(
                    "the controller did not become ready".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let page = |q: &mut SyncQueue, cns: u8, nsid: u32| -> Result<[u8; 4096], NvmfError> {
            let (_, d) = q.command("Identify", fabrics::identify(cns, nsid), &[], 4096)?;
            d.try_into()
                .map_err(|_| NvmfError::Protocol("short Identify page".into()))
        };
        let ctrl_page = page(&mut admin, spec::cns::CONTROLLER, 0)?;
        let identify = IdentifyController::parse(&ctrl_page);
        let fab = FabricsIdentity::parse(&ctrl_page);
        if fab.icdoff != 0 {
            return Err(NvmfError::Unusable(
                "in-capsule data offset (ICDOFF) not supported".into(),
            ));
        }
        let (q, _) = admin.command(
            "Set Features (number of queues)",
            Command::set_number_of_queues(64),
            &[],
            0,
        )?;
        let granted = ((q.result & 0xffff).min(q.result >> 16) + 1).min(64) as u16;
        let list = page(&mut admin, spec::cns::ACTIVE_NAMESPACES, 0)?;
        let mut namespaces = Vec::new();
        for nsid in spec::parse_namespace_list(&list) {
            let p = page(&mut admin, spec::cns::NAMESPACE, nsid)?;
            let ns = IdentifyNamespace::parse(&p);
            if ns.block_size == 0 || ns.metadata_size != 0 || ns.size_blocks == 0 {
                tracing::warn!(nsid, "NVMe/TCP namespace with an unusable format skipped");
                continue;
            }
            namespaces.push(Namespace {
                nsid,
                blocks: ns.size_blocks,
                block_size: ns.block_size,
                read_only: p[99] & 1 != 0,
            });
        }
        let mdts_bytes = if identify.mdts == 0 {
            usize::MAX
        } else {
            caps.min_page_size << identify.mdts
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ctrl = Arc::new(Self {
            in_capsule: fab.ioccsz.saturating_sub(64) as usize,
            max_cmd_bytes: MAX_CMD_BYTES.min(mdts_bytes),
            opts,
            cntlid,
            namespaces,
            identify,
            free_qids: Mutex::new((1..=granted).rev().collect()),
            stop: Arc::clone(&stop),
        });
        let name = ctrl.opts.subnqn.clone();
        std::thread::Builder::new()
            .name("nvmf_keepalive".into())
            .spawn(move || keep_alive(admin, &stop, &name))
            .map_err(io("keep-alive thread"))?;
        tracing::info!(subnqn = %ctrl.opts.subnqn, cntlid, io_queues = granted, "NVMe/TCP controller connected");
        Ok(ctrl)
    }

    /// Its controller id.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// The namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Options it was connected with.
    pub fn options(&self) -> &HostOptions {
        &self.opts
    }

    /// What Identify Controller said.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// Connects a new I/O queue (blocking: on a control thread, or once per reactor).
    pub fn open_io_queue(self: &Arc<Self>, nsid: u32) -> Result<IoQueue, NvmfError> {
        let ns = *self
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or_else(|| NvmfError::Unusable(format!("no namespace {nsid}")))?;
        let qid = self
            .free_qids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or_else(|| NvmfError::Unusable("no I/O queue left on the controller".into()))?;
        let depth = self.opts.queue_depth.clamp(2, 1024);
        // This queue never looks at SQHD: asking for SQ flow control to be disabled lets the
        // controller end reads with C2HData SUCCESS and no response capsule. A controller that
        // refuses the attribute gets a plain Connect.
        let sq_flow = fabrics::CATTR_DISABLE_SQ_FLOW;
        let q = match SyncQueue::connect_with(&self.opts, qid, depth, self.cntlid, 0, sq_flow) {
            Err(NvmfError::Status { status, .. })
                if status.kind() == fabrics::status::CONNECT_INVALID_PARAMS.kind() =>
            {
                SyncQueue::connect(&self.opts, qid, depth, self.cntlid, 0)
            }
            other => other,
        };
        let q = q.and_then(|(q, _)| q.into_connection());
        match q.and_then(|conn| IoQueue::start(Arc::clone(self), qid, ns, depth, conn)) {
            Ok(q) => Ok(q),
            Err(e) => {
                self.release_qid(qid);
                Err(e)
            }
        }
    }

    /// Gives back the id of a queue that closed.
    pub(super) fn release_qid(&self, qid: u16) {
        self.free_qids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(qid);
    }
}

impl Drop for HostController {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn keep_alive(mut admin: SyncQueue, stop: &AtomicBool, name: &str) {
    let period = Duration::from_millis(KATO_MS as u64 / 2);
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + period;
        if let Err(e) = admin.command("Keep Alive", fabrics::keep_alive(), &[], 0) {
            tracing::warn!(subnqn = name, %e, "NVMe/TCP keep alive failed");
            return;
        }
    }
    // Clean shutdown of the controller (CC.SHN) before the admin connection closes.
    let _ = admin.command(
        "Property Set CC",
        fabrics::property_set(spec::REG_CC as u32, spec::CC_EN | spec::CC_SHN_NORMAL),
        &[],
        0,
    );
}
