//! One NVMe controller: reset and enable with CAP.TO as the limit, the admin queue, Identify,
//! Set Features (number of queues), I/O queue ids, and the recovery from a fatal status.
//!
//! The admin queue sits behind a mutex: the control plane and reactors opening channels share
//! it, and admin commands are rare. Each admin command waits for its completion (a reactor
//! opening a channel blocks for that long, as it does opening an io_uring ring).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hugepages::BufferPool;

use super::dma::DeviceMemory;
use super::queue::{Device, QueuePair};
use super::spec::{
    cc_enable, cns, Capabilities, Command, Completion, IdentifyController, IdentifyNamespace,
    Status, CC_EN, CC_SHN_MASK, CC_SHN_NORMAL, CSTS_CFS, CSTS_RDY, CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK, PAGE_SIZE, REG_ACQ, REG_AQA, REG_ASQ, REG_CAP, REG_CC, REG_CSTS, REG_VS,
};
use super::NvmeError;

/// Admin queue slots.
const ADMIN_ENTRIES: u16 = 32;
/// Most I/O queue pairs the driver asks for.
const MAX_IO_QUEUES: u16 = 64;
/// Largest command the driver sends: one PRP list page of entries.
const MAX_COMMAND_BYTES: u64 = 256 * PAGE_SIZE as u64;

/// Tunables of a controller.
#[derive(Debug, Clone, Copy)]
pub struct ControllerOptions {
    /// How long an I/O command may take before it is aborted.
    pub io_timeout: Duration,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// Slots of each I/O queue (capped by CAP.MQES).
    pub io_queue_entries: u16,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(10),
            io_queue_entries: 256,
        }
    }
}

/// A namespace the controller reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Bytes per block.
    pub block_size: u32,
    /// Blocks.
    pub num_blocks: u64,
}

struct Admin {
    queue: QueuePair,
    page: DeviceMemory,
    _page_pool: BufferPool,
    next_cid: u16,
}

/// A controller, shared by its namespaces' bdevs and their channels.
pub struct Controller {
    name: String,
    dev: Arc<dyn Device>,
    cap: Capabilities,
    options: ControllerOptions,
    admin: Mutex<Admin>,
    identify: IdentifyController,
    version: u32,
    io_queues: Mutex<Vec<bool>>,
    generation: AtomicU64,
    failed: AtomicBool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("model", &self.identify.model)
            .finish()
    }
}

fn wait_for(
    dev: &dyn Device,
    limit: Duration,
    what: &'static str,
    done: impl Fn(u32) -> bool,
) -> Result<u32, NvmeError> {
    let start = Instant::now();
    loop {
        let csts = dev.read32(REG_CSTS);
        if csts == u32::MAX {
            return Err(NvmeError::Gone);
        }
        if done(csts) {
            return Ok(csts);
        }
        if start.elapsed() > limit {
            return Err(NvmeError::Timeout { what, limit });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Controller {
    /// Resets and enables the controller behind `dev`, identifies it and its namespaces and
    /// asks for I/O queues.
    pub fn start(
        name: &str,
        dev: Arc<dyn Device>,
        options: ControllerOptions,
    ) -> Result<(Arc<Self>, Vec<Namespace>), NvmeError> {
        let cap = Capabilities::parse(dev.read64(REG_CAP));
        if !cap.nvm_command_set {
            return Err(NvmeError::Unsupported(
                "a controller without the NVM command set".into(),
            ));
        }
        if cap.min_page_size > PAGE_SIZE {
            return Err(NvmeError::Unsupported(format!(
                "a minimum memory page size of {} bytes",
                cap.min_page_size
            )));
        }
        let version = dev.read32(REG_VS);
        let queue = QueuePair::new(
            Arc::clone(&dev),
            &cap,
            0,
            ADMIN_ENTRIES.min(cap.max_queue_entries as u16),
        )?;
        let page_pool = BufferPool::new(PAGE_SIZE, 1)?;
        let page = page_pool
            .get()
            .map(DeviceMemory::new)
            .ok_or_else(|| NvmeError::Unsupported("identify memory".into()))?;
        let mut admin = Admin {
            queue,
            page,
            _page_pool: page_pool,
            next_cid: 0,
        };
        enable(&*dev, &cap, &mut admin)?;
        let ident = identify_controller(&*dev, &cap, &mut admin, options.admin_timeout)?;
        let granted = set_queue_count(&*dev, &cap, &mut admin, options.admin_timeout)?;
        let namespaces =
            identify_namespaces(&*dev, &cap, &mut admin, options.admin_timeout, &ident)?;
        tracing::info!(
            controller = name,
            model = %ident.model,
            serial = %ident.serial,
            firmware = %ident.firmware,
            version = format_args!("{}.{}", version >> 16, (version >> 8) & 0xff),
            io_queues = granted,
            namespaces = namespaces.len(),
            sgl = ident.supports_sgl(),
            "NVMe controller ready"
        );
        let ctrl = Arc::new(Self {
            name: name.to_string(),
            dev,
            cap,
            options,
            admin: Mutex::new(admin),
            identify: ident,
            version,
            io_queues: Mutex::new(vec![false; granted as usize]),
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        });
        Ok((ctrl, namespaces))
    }

    /// The controller's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Identify Controller data.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// NVMe version (major << 16 | minor << 8 | tertiary).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    pub(crate) fn capabilities(&self) -> &Capabilities {
        &self.cap
    }

    pub(crate) fn options(&self) -> &ControllerOptions {
        &self.options
    }

    /// Largest transfer of one command in bytes.
    pub fn max_transfer(&self) -> u64 {
        let mdts = match self.identify.mdts {
            0 => u64::MAX,
            m => (self.cap.min_page_size as u64) << m.min(40),
        };
        mdts.min(MAX_COMMAND_BYTES)
    }

    /// Slots of an I/O queue.
    pub(crate) fn io_queue_entries(&self) -> u16 {
        (self.options.io_queue_entries as u32).clamp(2, self.cap.max_queue_entries.min(4096)) as u16
    }

    /// Incremented by every reset: channels rebuild their queues when it changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// True once a reset failed: the controller is unusable.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn admin(&self) -> MutexGuard<'_, Admin> {
        self.admin.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a free I/O queue id.
    pub(crate) fn take_queue_id(&self) -> Result<u16, NvmeError> {
        let mut ids = self
            .io_queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let free = ids
            .iter()
            .position(|used| !used)
            .ok_or(NvmeError::NoQueues)?;
        ids[free] = true;
        Ok(free as u16 + 1)
    }

    /// Returns an I/O queue id.
    pub(crate) fn release_queue_id(&self, qid: u16) {
        let mut ids = self
            .io_queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(used) = ids.get_mut(qid as usize - 1) {
            *used = false;
        }
    }

    /// Runs one admin command and waits for it; a failed status is an error.
    pub fn admin_command(&self, cmd: Command) -> Result<Completion, NvmeError> {
        if self.failed() {
            return Err(NvmeError::Failed);
        }
        let mut admin = self.admin();
        run_admin(&*self.dev, &mut admin, cmd, self.options.admin_timeout)
    }

    /// Creates I/O queue pair `queue` on the controller, interrupting on `vector` if given.
    pub(crate) fn create_io_queue(
        &self,
        queue: &QueuePair,
        vector: Option<u16>,
    ) -> Result<(), NvmeError> {
        self.admin_command(Command::create_io_cq(
            queue.qid,
            queue.entries(),
            queue.cq_iova(),
            vector,
        ))?;
        let sq = self.admin_command(Command::create_io_sq(
            queue.qid,
            queue.entries(),
            queue.sq_iova(),
            queue.qid,
        ));
        if let Err(e) = sq {
            let _ = self.admin_command(Command::delete_io_cq(queue.qid));
            return Err(e);
        }
        Ok(())
    }

    /// Deletes I/O queue pair `qid` (its outstanding commands are aborted by the controller).
    pub(crate) fn delete_io_queue(&self, qid: u16) -> Result<(), NvmeError> {
        self.admin_command(Command::delete_io_sq(qid))?;
        self.admin_command(Command::delete_io_cq(qid))?;
        Ok(())
    }

    /// Asks the controller to abort command `cid` of queue `sqid`. True when the controller
    /// says it aborted it (it then completes the command with "abort requested").
    pub(crate) fn abort(&self, sqid: u16, cid: u16) -> bool {
        match self.admin_command(Command::abort(sqid, cid)) {
            Ok(c) => c.result & 1 == 0,
            Err(e) => {
                tracing::warn!(controller = %self.name, %e, sqid, cid, "abort failed");
                false
            }
        }
    }

    /// True when CSTS reports a fatal error or the device has gone.
    pub(crate) fn fatal_status(&self) -> bool {
        let csts = self.dev.read32(REG_CSTS);
        csts == u32::MAX || csts & CSTS_CFS != 0
    }

    /// Resets the controller unless another caller already did since `seen_generation`: disable,
    /// wait for CSTS.RDY to clear, enable again with a fresh admin queue and ask for the I/O
    /// queues again. Channels see the new generation, fail what they had in flight (the reset
    /// ended every command) and recreate their queues. A controller that does not come back is
    /// cut off from memory and marked failed.
    pub fn reset(&self, seen_generation: u64) -> Result<(), NvmeError> {
        let mut admin = self.admin();
        if self.generation() != seen_generation || self.failed() {
            return if self.failed() {
                Err(NvmeError::Failed)
            } else {
                Ok(())
            };
        }
        tracing::warn!(controller = %self.name, "resetting the controller");
        let result = (|| {
            self.dev.write32(REG_CC, 0);
            wait_for(
                &*self.dev,
                self.reset_timeout(),
                "controller disable",
                |c| c & CSTS_RDY == 0,
            )?;
            enable(&*self.dev, &self.cap, &mut admin)?;
            let granted = set_queue_count(
                &*self.dev,
                &self.cap,
                &mut admin,
                self.options.admin_timeout,
            )?;
            let had = self
                .io_queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            if (granted as usize) < had {
                return Err(NvmeError::NoQueues);
            }
            Ok(())
        })();
        match &result {
            Ok(()) => tracing::info!(controller = %self.name, "controller reset done"),
            Err(e) => {
                tracing::error!(controller = %self.name, %e, "controller reset failed: device cut off");
                self.dev.stop_dma();
                self.failed.store(true, Ordering::Release);
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn reset_timeout(&self) -> Duration {
        Duration::from_millis(self.cap.timeout_ms.max(500))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.failed() {
            return;
        }
        // A normal shutdown lets the controller flush its cache before the device is released.
        let cc = self.dev.read32(REG_CC);
        self.dev
            .write32(REG_CC, (cc & !CC_SHN_MASK) | CC_SHN_NORMAL);
        let done = wait_for(&*self.dev, self.reset_timeout(), "shutdown", |c| {
            c & CSTS_SHST_MASK == CSTS_SHST_COMPLETE
        });
        if let Err(e) = done {
            tracing::warn!(controller = %self.name, %e, "controller shutdown incomplete");
        }
        self.dev.write32(REG_CC, 0);
        tracing::info!(controller = %self.name, "NVMe controller detached");
    }
}

/// Disables the controller if needed, installs the admin queue and enables it.
fn enable(dev: &dyn Device, cap: &Capabilities, admin: &mut Admin) -> Result<(), NvmeError> {
    let limit = Duration::from_millis(cap.timeout_ms.max(500));
    if dev.read32(REG_CC) & CC_EN != 0 {
        dev.write32(REG_CC, 0);
    }
    wait_for(dev, limit, "controller disable", |c| c & CSTS_RDY == 0)?;
    admin.queue.reset();
    admin.next_cid = 0;
    let entries = admin.queue.entries() as u32 - 1;
    dev.write32(REG_AQA, (entries << 16) | entries);
    dev.write64(REG_ASQ, admin.queue.sq_iova());
    dev.write64(REG_ACQ, admin.queue.cq_iova());
    dev.write32(REG_CC, cc_enable());
    let csts = wait_for(dev, limit, "controller enable", |c| {
        c & (CSTS_RDY | CSTS_CFS) != 0
    })?;
    if csts & CSTS_CFS != 0 {
        return Err(NvmeError::Fatal);
    }
    Ok(())
}

fn run_admin(
    dev: &dyn Device,
    admin: &mut Admin,
    cmd: Command,
    limit: Duration,
) -> Result<Completion, NvmeError> {
    let cid = admin.next_cid;
    admin.next_cid = admin.next_cid.wrapping_add(1);
    admin.queue.push(&cmd.with_cid(cid));
    admin.queue.ring();
    let start = Instant::now();
    loop {
        if let Some(c) = admin.queue.next_completion() {
            admin.queue.ring_completions();
            if c.cid != cid {
                // A completion of an earlier command that timed out: skip it.
                continue;
            }
            if !c.status.is_success() {
                return Err(NvmeError::Command {
                    opcode: cmd.opcode(),
                    status: c.status,
                });
            }
            return Ok(c);
        }
        if start.elapsed() > limit {
            let csts = dev.read32(REG_CSTS);
            if csts == u32::MAX || csts & CSTS_CFS != 0 {
                return Err(NvmeError::Fatal);
            }
            return Err(NvmeError::Timeout {
                what: "admin command",
                limit,
            });
        }
        std::hint::spin_loop();
    }
}

fn identify_page(
    dev: &dyn Device,
    admin: &mut Admin,
    limit: Duration,
    cns: u8,
    nsid: u32,
) -> Result<Box<[u8; 4096]>, NvmeError> {
    admin.page.clear();
    let cmd = Command::identify(cns, nsid, admin.page.iova());
    run_admin(dev, admin, cmd, limit)?;
    let mut out = Box::new([0u8; 4096]);
    admin.page.read_bytes(&mut out[..]);
    Ok(out)
}

fn identify_controller(
    dev: &dyn Device,
    _cap: &Capabilities,
    admin: &mut Admin,
    limit: Duration,
) -> Result<IdentifyController, NvmeError> {
    let page = identify_page(dev, admin, limit, cns::CONTROLLER, 0)?;
    Ok(IdentifyController::parse(&page))
}

fn set_queue_count(
    dev: &dyn Device,
    cap: &Capabilities,
    admin: &mut Admin,
    limit: Duration,
) -> Result<u16, NvmeError> {
    // Doorbells beyond the mapped registers cannot be rung.
    let reachable = (dev
        .register_space()
        .saturating_sub(super::spec::DOORBELL_BASE)
        / (2 * cap.doorbell_stride))
        .saturating_sub(1)
        .min(MAX_IO_QUEUES as usize) as u16;
    if reachable == 0 {
        return Err(NvmeError::NoQueues);
    }
    let c = run_admin(dev, admin, Command::set_number_of_queues(reachable), limit)?;
    let sq = (c.result & 0xffff) as u16 + 1;
    let cq = (c.result >> 16) as u16 + 1;
    Ok(sq.min(cq).min(reachable))
}

fn identify_namespaces(
    dev: &dyn Device,
    _cap: &Capabilities,
    admin: &mut Admin,
    limit: Duration,
    ident: &IdentifyController,
) -> Result<Vec<Namespace>, NvmeError> {
    let list = identify_page(dev, admin, limit, cns::ACTIVE_NAMESPACES, 0)
        .map(|p| super::spec::parse_namespace_list(&p))
        .unwrap_or_else(|e| {
            tracing::debug!(%e, "no active namespace list: trying every namespace id");
            (1..=ident.namespaces.min(1024)).collect()
        });
    let mut out = Vec::new();
    for nsid in list {
        let page = identify_page(dev, admin, limit, cns::NAMESPACE, nsid)?;
        let ns = IdentifyNamespace::parse(&page);
        if ns.size_blocks == 0 {
            continue;
        }
        if ns.block_size == 0 || ns.metadata_size != 0 {
            tracing::warn!(
                nsid,
                block_size = ns.block_size,
                metadata = ns.metadata_size,
                "namespace format not supported: skipped"
            );
            continue;
        }
        out.push(Namespace {
            nsid,
            block_size: ns.block_size,
            num_blocks: ns.size_blocks,
        });
    }
    Ok(out)
}

/// True for the status of a command the controller aborted on request.
pub(crate) fn was_aborted(status: Status) -> bool {
    status.kind() == Status::ABORT_REQUESTED
}
