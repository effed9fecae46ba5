//! The VFIO calls of the NVMe driver: container, group and device file descriptors, BAR0
//! mapped for register access, DMA mappings into the IOMMU, PCI bus mastering and MSI-X
//! vectors routed to eventfds. The driver above sees [`VfioPci`] as a [`Device`], and uses
//! [`canonical_pci_addr`] to check the addresses it is given.
//!
//! Every `unsafe` block and impl (each ioctl, the BAR0 `mmap` and `munmap`, taking ownership of
//! the device descriptor, the volatile register accesses, `Send` and `Sync` for the mapping)
//! carries its SAFETY note. The ioctls that bring the device up (API version, IOMMU extension,
//! group status, group to container, IOMMU type, device descriptor, device info) run inline in
//! [`VfioPci::open`]; region info, IRQ info, SET_IRQS and the container's DMA map and unmap each
//! have a small function of their own. Every ioctl's return code is checked with `check` right
//! after the call (a failed DMA unmap, which cannot be returned, is logged), except
//! VFIO_CHECK_EXTENSION's: a failure there counts as the extension being absent.
//!
//! The layouts and request numbers are those of the kernel's `include/uapi/linux/vfio.h`
//! (`_IO(';', 100 + n)`).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use hugepages::{DmaError, DmaMapper};

use super::queue::Device;
use super::NvmeError;

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;

const fn vfio_io(n: libc::c_ulong) -> libc::c_ulong {
    ((b';' as libc::c_ulong) << 8) | (100 + n)
}
const GET_API_VERSION: libc::c_ulong = vfio_io(0);
const CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const SET_IOMMU: libc::c_ulong = vfio_io(2);
const GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);
const DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
const IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

const GROUP_FLAGS_VIABLE: u32 = 1;
const DEVICE_FLAGS_PCI: u32 = 1 << 1;
const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const DMA_MAP_FLAG_READ: u32 = 1;
const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
const IRQ_SET_DATA_NONE: u32 = 1;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const PCI_BAR0_REGION_INDEX: u32 = 0;
const PCI_CONFIG_REGION_INDEX: u32 = 7;
const PCI_MSIX_IRQ_INDEX: u32 = 2;
/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// BAR0 bytes mapped: the registers and the first doorbells, short of the MSI-X table that
/// controllers place after them.
const BAR0_MAP_LEN: u64 = 0x2000;

#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

#[repr(C)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct IrqInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    count: u32,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NvmeError {
    let what = what.into();
    move |source| NvmeError::Os { what, source }
}

/// Checks an ioctl's return value.
fn check(ret: libc::c_int, what: &str) -> Result<libc::c_int, NvmeError> {
    if ret < 0 {
        Err(NvmeError::Os {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

/// `0000:00:04.0` from `0000:00:04.0` or `00:04.0`; anything else is refused (the address
/// becomes a path under /sys).
pub fn canonical_pci_addr(addr: &str) -> Result<String, NvmeError> {
    let full = if addr.len() == 7 {
        format!("0000:{addr}")
    } else {
        addr.to_string()
    };
    let b = full.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_hexdigit());
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11]);
    if !ok {
        return Err(NvmeError::Setup(format!(
            "'{addr}' is not a PCI address (DDDD:BB:DD.F or BB:DD.F)"
        )));
    }
    Ok(full.to_ascii_lowercase())
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// A VFIO container: the IOMMU context DMA memory is mapped into.
struct Container {
    file: File,
}

impl DmaMapper for Container {
    fn map(&self, vaddr: usize, len: usize, iova: u64) -> Result<(), DmaError> {
        let map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA reads the struct, which lives across the call; the kernel
        // pins the pages of vaddr..vaddr+len, a live DMA region the registry owns until it
        // unmaps it here again, so the device never reaches memory the process has released.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), IOMMU_MAP_DMA, &map) };
        check(ret, "VFIO_IOMMU_MAP_DMA")
            .map(|_| ())
            .map_err(|e| DmaError::Mapper(format!("{e} (iova {iova:#x}, {len} bytes)")))
    }

    fn unmap(&self, iova: u64, len: usize) {
        let unmap = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: len as u64,
        };
        // SAFETY: VFIO_IOMMU_UNMAP_DMA reads and updates the struct, which lives across the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), IOMMU_UNMAP_DMA, &unmap) };
        if let Err(e) = check(ret, "VFIO_IOMMU_UNMAP_DMA") {
            tracing::error!(%e, iova, len, "unmapping DMA memory from the IOMMU failed");
        }
    }
}

/// BAR0 mapped into the process.
struct Bar {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory owned by this value; all access is volatile 32-bit
// MMIO, which the device serializes itself, so sharing it between threads is sound.
unsafe impl Send for Bar {}
// SAFETY: as above.
unsafe impl Sync for Bar {}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: ptr..ptr+len is the mapping made in `VfioPci::open`, used by nothing else now.
        let ret = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if ret != 0 {
            tracing::error!(e = %std::io::Error::last_os_error(), "munmap of BAR0 failed");
        }
    }
}

/// A PCI NVMe controller bound to vfio-pci, opened through its IOMMU group.
pub struct VfioPci {
    addr: String,
    // Field order is drop order: the mapping goes before the device file it maps.
    bar: Bar,
    device: File,
    config_offset: u64,
    msix_vectors: u16,
    mapper: Arc<dyn DmaMapper>,
    _group: File,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci").field("addr", &self.addr).finish()
    }
}

impl VfioPci {
    /// Opens the device at PCI address `addr` (bound to vfio-pci), maps BAR0, enables bus
    /// mastering and MSI-X, and maps every DMA region into its IOMMU (and every later one).
    pub fn open(addr: &str) -> Result<Self, NvmeError> {
        let addr = canonical_pci_addr(addr)?;
        let sys = PathBuf::from("/sys/bus/pci/devices").join(&addr);
        if !sys.exists() {
            return Err(NvmeError::Setup(format!("no PCI device {addr}")));
        }
        match link_name(&sys.join("driver")).as_deref() {
            Some("vfio-pci") => {}
            other => {
                return Err(NvmeError::Setup(format!(
                    "{addr} is bound to {}, not vfio-pci: echo vfio-pci > {}/driver_override, \
                     unbind it from its driver and echo {addr} > /sys/bus/pci/drivers_probe",
                    other.unwrap_or("no driver"),
                    sys.display()
                )))
            }
        }
        let group_id = link_name(&sys.join("iommu_group")).ok_or_else(|| {
            NvmeError::Setup(format!("{addr} has no IOMMU group (is the IOMMU enabled?)"))
        })?;
        let rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
        let container = rw("/dev/vfio/vfio").map_err(os("open /dev/vfio/vfio"))?;
        let cfd = container.as_raw_fd();
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let ret = unsafe { libc::ioctl(cfd, GET_API_VERSION) };
        let version = check(ret, "VFIO_GET_API_VERSION")?;
        if version != VFIO_API_VERSION {
            return Err(NvmeError::Setup(format!(
                "unknown VFIO API version {version}"
            )));
        }
        let iommu = [VFIO_TYPE1V2_IOMMU, VFIO_TYPE1_IOMMU]
            .into_iter()
            // SAFETY: VFIO_CHECK_EXTENSION takes an integer argument.
            .find(|&t| unsafe { libc::ioctl(cfd, CHECK_EXTENSION, t) } > 0)
            .ok_or_else(|| NvmeError::Setup("VFIO has no type 1 IOMMU support".into()))?;
        let group_path = format!("/dev/vfio/{group_id}");
        let group = rw(&group_path).map_err(os(format!("open {group_path}")))?;
        let gfd = group.as_raw_fd();
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS writes the struct, which lives across the call.
        let ret = unsafe { libc::ioctl(gfd, GROUP_GET_STATUS, &mut status) };
        check(ret, "VFIO_GROUP_GET_STATUS")?;
        if status.flags & GROUP_FLAGS_VIABLE == 0 {
            return Err(NvmeError::Setup(format!(
                "IOMMU group {group_id} is not viable: bind every device in it to vfio-pci"
            )));
        }
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads the container fd the pointer points at.
        let ret = unsafe { libc::ioctl(gfd, GROUP_SET_CONTAINER, &cfd) };
        check(ret, "VFIO_GROUP_SET_CONTAINER")?;
        // SAFETY: VFIO_SET_IOMMU takes an integer argument.
        let ret = unsafe { libc::ioctl(cfd, SET_IOMMU, iommu) };
        check(ret, "VFIO_SET_IOMMU")?;
        let name = CString::new(addr.as_str())
            .map_err(|_| NvmeError::Setup(format!("bad PCI address {addr}")))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads the NUL-terminated name, alive across the call.
        let ret = unsafe { libc::ioctl(gfd, GROUP_GET_DEVICE_FD, name.as_ptr()) };
        let dfd = check(ret, "VFIO_GROUP_GET_DEVICE_FD")?;
        // SAFETY: the ioctl just returned this new descriptor, owned by nothing else.
        let device = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dfd) };
        let mut info = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        };
        // SAFETY: VFIO_DEVICE_GET_INFO writes the struct, which lives across the call.
        let ret = unsafe { libc::ioctl(dfd, DEVICE_GET_INFO, &mut info) };
        check(ret, "VFIO_DEVICE_GET_INFO")?;
        if info.flags & DEVICE_FLAGS_PCI == 0 || info.num_regions <= PCI_CONFIG_REGION_INDEX {
            return Err(NvmeError::Setup(format!("{addr} is not a VFIO PCI device")));
        }
        let bar0 = region_info(dfd, PCI_BAR0_REGION_INDEX)?;
        if bar0.flags & REGION_INFO_FLAG_MMAP == 0 || bar0.size < 0x1008 {
            return Err(NvmeError::Setup(format!("BAR0 of {addr} cannot be mapped")));
        }
        let len = bar0.size.min(BAR0_MAP_LEN) as usize;
        // SAFETY: a new shared mapping of the device's BAR0 at an address the kernel chooses;
        // it aliases no Rust object and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dfd,
                bar0.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(NvmeError::Os {
                what: "mmap BAR0".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let bar = Bar {
            ptr: NonNull::new(ptr.cast())
                .ok_or_else(|| NvmeError::Setup("mmap gave null".into()))?,
            len,
        };
        let config_offset = region_info(dfd, PCI_CONFIG_REGION_INDEX)?.offset;
        set_command_bits(
            &device,
            config_offset,
            PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
            true,
        )?;
        let msix_vectors = enable_msix(dfd).unwrap_or_else(|e| {
            tracing::info!(%e, "no MSI-X: queues are polled only");
            0
        });
        let mapper: Arc<dyn DmaMapper> = Arc::new(Container { file: container });
        hugepages::register_mapper(Arc::clone(&mapper))?;
        tracing::info!(pci = %addr, group = %group_id, bar0 = bar0.size, msix_vectors, "VFIO device open");
        Ok(Self {
            addr,
            bar,
            device,
            config_offset,
            msix_vectors,
            mapper,
            _group: group,
        })
    }

    /// The PCI address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn set_irqs(&self, flags: u32, start: u32, fds: &[RawFd]) -> Result<(), NvmeError> {
        set_irqs(self.device.as_raw_fd(), flags, start, fds)
    }
}

fn region_info(dfd: RawFd, index: u32) -> Result<RegionInfo, NvmeError> {
    let mut info = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        flags: 0,
        index,
        cap_offset: 0,
        size: 0,
        offset: 0,
    };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO reads the index and writes the struct, which lives
    // across the call and is as large as argsz says.
    let ret = unsafe { libc::ioctl(dfd, DEVICE_GET_REGION_INFO, &mut info) };
    check(ret, "VFIO_DEVICE_GET_REGION_INFO")?;
    Ok(info)
}

fn set_command_bits(device: &File, config: u64, bits: u16, on: bool) -> Result<(), NvmeError> {
    let mut cmd = [0u8; 2];
    device
        .read_exact_at(&mut cmd, config + PCI_COMMAND)
        .map_err(os("read PCI command register"))?;
    let mut value = u16::from_le_bytes(cmd);
    if on {
        value |= bits;
    } else {
        value &= !bits;
    }
    device
        .write_all_at(&value.to_le_bytes(), config + PCI_COMMAND)
        .map_err(os("write PCI command register"))
}

fn set_irqs(dfd: RawFd, flags: u32, start: u32, fds: &[RawFd]) -> Result<(), NvmeError> {
    // struct vfio_irq_set: argsz, flags, index, start, count, then the eventfds.
    let mut buf: Vec<u32> = vec![0, flags, PCI_MSIX_IRQ_INDEX, start, fds.len() as u32];
    if flags & IRQ_SET_DATA_EVENTFD != 0 {
        buf.extend(fds.iter().map(|&fd| fd as u32));
    }
    buf[0] = (buf.len() * 4) as u32;
    // SAFETY: VFIO_DEVICE_SET_IRQS reads argsz bytes of the buffer, which lives across the call
    // and holds the header and one eventfd per vector; the kernel takes its own references to
    // the eventfds.
    let ret = unsafe { libc::ioctl(dfd, DEVICE_SET_IRQS, buf.as_ptr()) };
    check(ret, "VFIO_DEVICE_SET_IRQS")?;
    Ok(())
}

/// Enables every MSI-X vector with no eventfd yet; returns how many there are.
fn enable_msix(dfd: RawFd) -> Result<u16, NvmeError> {
    let mut info = IrqInfo {
        argsz: std::mem::size_of::<IrqInfo>() as u32,
        flags: 0,
        index: PCI_MSIX_IRQ_INDEX,
        count: 0,
    };
    // SAFETY: VFIO_DEVICE_GET_IRQ_INFO reads the index and writes the struct, alive across it.
    let ret = unsafe { libc::ioctl(dfd, DEVICE_GET_IRQ_INFO, &mut info) };
    check(ret, "VFIO_DEVICE_GET_IRQ_INFO")?;
    let count = info.count.min(u16::MAX as u32) as u16;
    if count == 0 {
        return Ok(0);
    }
    let none = vec![-1; count as usize];
    set_irqs(dfd, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, &none)?;
    Ok(count)
}

impl Device for VfioPci {
    fn read32(&self, offset: usize) -> u32 {
        if !offset.is_multiple_of(4) || offset + 4 > self.bar.len {
            tracing::error!(offset, "register read outside the mapped BAR0");
            return u32::MAX;
        }
        // SAFETY: the offset is aligned and inside the live BAR0 mapping (checked above); MMIO
        // must be one volatile 32-bit access.
        unsafe { std::ptr::read_volatile(self.bar.ptr.as_ptr().add(offset).cast::<u32>()) }
    }

    fn write32(&self, offset: usize, value: u32) {
        if !offset.is_multiple_of(4) || offset + 4 > self.bar.len {
            tracing::error!(offset, "register write outside the mapped BAR0");
            return;
        }
        // SAFETY: as in `read32`.
        unsafe { std::ptr::write_volatile(self.bar.ptr.as_ptr().add(offset).cast::<u32>(), value) }
    }

    fn register_space(&self) -> usize {
        self.bar.len
    }

    fn interrupt_vectors(&self) -> u16 {
        self.msix_vectors
    }

    fn route_interrupt(&self, vector: u16, fd: Option<RawFd>) -> Result<(), NvmeError> {
        if vector >= self.msix_vectors {
            return Err(NvmeError::Unsupported(format!("MSI-X vector {vector}")));
        }
        self.set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            vector as u32,
            &[fd.unwrap_or(-1)],
        )
    }

    fn stop_dma(&self) {
        if let Err(e) =
            set_command_bits(&self.device, self.config_offset, PCI_COMMAND_MASTER, false)
        {
            tracing::error!(pci = %self.addr, %e, "could not turn bus mastering off");
        }
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        if self.msix_vectors > 0 {
            if let Err(e) = self.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, &[]) {
                tracing::warn!(%e, "disabling MSI-X failed");
            }
        }
        self.stop_dma();
        hugepages::unregister_mapper(&self.mapper);
    }
}
