//! Choosing the device a run computes on, and describing what the machine offers.

use crate::TrainError;
use crate::memory;
use burn::prelude::*;
use kiln_config::{AdapterChoice, BackendConfig, BackendKind};

/// The device a run uses, with a line that says what it is.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub kind: BackendKind,
    pub description: String,
    /// The memory the device may use, when it can be read, and where the figure comes from.
    pub budget: Option<Budget>,
}

/// A detected memory budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub bytes: u64,
    /// `Metal working set`, `Vulkan device-local heap`, `MemAvailable`, `cgroup memory.max`.
    pub source: String,
}

/// What a CPU run may use: available RAM, or the cgroup limit when that is lower.
pub fn cpu_budget() -> Option<Budget> {
    let available = memory::host_memory()
        .map(|(_, available)| Budget {
            bytes: available,
            source: "MemAvailable".into(),
        })
        .or_else(|| {
            memory::physical_memory().map(|bytes| Budget {
                bytes,
                source: "physical memory".into(),
            })
        });
    let cgroup = memory::cgroup_limit().map(|limit| Budget {
        bytes: limit.saturating_sub(memory::cgroup_usage().unwrap_or(0)),
        source: "cgroup memory.max".into(),
    });
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(if c.bytes < a.bytes { c } else { a }),
        (a, c) => a.or(c),
    }
}

/// What a GPU adapter may use, where its driver reports it.
pub fn gpu_budget(found: &AdapterSummary) -> Option<Budget> {
    found.memory_budget.map(|bytes| Budget {
        bytes,
        source: if found.backend == "Metal" {
            "Metal working set".into()
        } else {
            "Vulkan device-local heap".into()
        },
    })
}

/// One graphics adapter wgpu can open.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub device_type: String,
    pub backend: String,
    pub driver: String,
    pub software: bool,
    pub max_buffer_size: u64,
    pub max_storage_binding: u64,
    /// What the GPU may use: Metal's `recommendedMaxWorkingSetSize`, or the largest Vulkan
    /// device-local heap (the figures CubeCL sizes its pools to). `None` where neither is read.
    pub memory_budget: Option<u64>,
}

/// The largest device-local heap of a Vulkan adapter.
#[cfg(not(target_os = "macos"))]
fn adapter_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    use ash::vk::MemoryHeapFlags;
    // SAFETY: read-only queries of a live adapter's physical device.
    unsafe {
        let hal = adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
        let props = hal
            .shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device());
        let n = (props.memory_heap_count as usize).min(props.memory_heaps.len());
        props.memory_heaps[..n]
            .iter()
            .filter(|h| h.flags.contains(MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size)
            .max()
    }
}

/// Metal's working set: what the GPU may keep resident of unified memory (it follows
/// `iogpu.wired_limit_mb`).
#[cfg(target_os = "macos")]
fn adapter_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    use objc2_metal::MTLDevice;
    // SAFETY: a read-only property of a live device.
    unsafe {
        let hal = adapter.as_hal::<wgpu::hal::api::Metal>()?;
        Some(hal.raw_device().recommendedMaxWorkingSetSize())
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    struct Thread(std::thread::Thread);
    impl Wake for Thread {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Thread(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// The adapters wgpu finds (Vulkan, Metal, ...), hardware and software alike.
pub fn list_adapters() -> Vec<AdapterSummary> {
    // Vulkan, Metal and DX12 only: kiln computes on none of the others, and probing GL
    // (EGL through Mesa) in a headless process corrupted the heap now and then under load
    // (`finetune --plan` aborted in 3 of 160 runs beside other work; none with these backends).
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
    descriptor.backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(descriptor);
    let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            let limits = a.limits();
            AdapterSummary {
                software: info.device_type == wgpu::DeviceType::Cpu,
                name: info.name,
                device_type: format!("{:?}", info.device_type),
                backend: format!("{:?}", info.backend),
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
                max_buffer_size: limits.max_buffer_size,
                max_storage_binding: limits.max_storage_buffer_binding_size,
                memory_budget: adapter_memory(&a),
            }
        })
        .filter(|a| a.backend != "Gl" && a.backend != "Noop")
        .collect()
}

fn cpu_device() -> SelectedDevice {
    let threads = crate::threads::count();
    let ram = memory::host_memory()
        .map(|(total, _)| format!(", {} RAM", memory::human_bytes(total)))
        .unwrap_or_default();
    SelectedDevice {
        device: Device::flex(),
        kind: BackendKind::Cpu,
        description: format!("cpu (Burn Flex, {threads} threads{ram})"),
        budget: cpu_budget(),
    }
}

/// Burn's name for the `slot`-th hardware adapter of `adapters` (wgpu's order): its index among
/// the adapters of its type.
fn hardware_kind(adapters: &[AdapterSummary], slot: usize) -> Option<(DeviceKind, usize)> {
    let hardware: Vec<usize> = (0..adapters.len())
        .filter(|&i| !adapters[i].software)
        .collect();
    let turn = slot % hardware.len().max(1);
    let at = *hardware.get(turn)?;
    let of_type = hardware[..turn]
        .iter()
        .filter(|&&i| adapters[i].device_type == adapters[at].device_type)
        .count();
    let kind = match adapters[at].device_type.as_str() {
        "IntegratedGpu" => DeviceKind::IntegratedGpu(of_type),
        "VirtualGpu" => DeviceKind::VirtualGpu(of_type),
        _ => DeviceKind::DiscreteGpu(of_type),
    };
    Some((kind, at))
}

fn wgpu_device(adapter: AdapterChoice, slot: Option<usize>) -> Result<SelectedDevice, TrainError> {
    open_wgpu(adapter, slot).map(|(_, selected)| selected)
}

/// The adapter wgpu opens for `adapter` (and a rank's `slot`), with Burn's name for it, which the
/// `vulkan` backend opens too.
fn open_wgpu(
    adapter: AdapterChoice,
    slot: Option<usize>,
) -> Result<(DeviceKind, SelectedDevice), TrainError> {
    let adapters = list_adapters();
    let wanted_software = adapter == AdapterChoice::Software;
    // Ranks on one machine each take their own GPU (in turn, when there are more ranks).
    let chosen = slot
        .filter(|_| !wanted_software)
        .and_then(|s| hardware_kind(&adapters, s));
    let found = match chosen {
        Some((_, at)) => adapters.get(at),
        None => adapters.iter().find(|a| a.software == wanted_software),
    };
    let Some(found) = found else {
        return Err(TrainError::Device(if wanted_software {
            "no software GPU adapter found (on Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
                .into()
        } else {
            "no hardware GPU adapter found through wgpu; use backend.kind: cpu, or \
             backend.adapter: software for a software Vulkan device"
                .into()
        }));
    };
    let kind = if wanted_software {
        // Autotuning every kernel on a software rasterizer takes minutes per shape (FACTS.md).
        if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
            // SAFETY: set once at device selection, before the runtime reads it.
            unsafe { std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal") };
        }
        DeviceKind::Cpu
    } else {
        chosen.map_or(DeviceKind::DefaultDevice, |(kind, _)| kind)
    };
    Ok((
        kind.clone(),
        SelectedDevice {
            budget: gpu_budget(found),
            device: Device::wgpu(kind),
            kind: BackendKind::Wgpu,
            description: format!(
                "wgpu: {} ({}, {}{}), compiler: {}",
                found.name,
                found.device_type,
                found.backend,
                if found.driver.is_empty() {
                    String::new()
                } else {
                    format!(", {}", found.driver)
                },
                compiler(BackendKind::Wgpu).unwrap_or("?")
            ),
        },
    ))
}

/// The language the backend's kernels are compiled to: Burn's `wgpu` feature writes WGSL
/// (naga turns it into SPIR-V or MSL, without matrix cores), `vulkan` CubeCL's own SPIR-V
/// (cooperative matrices), `metal` MSL (simdgroup matrices). None for the CPU.
pub fn compiler(kind: BackendKind) -> Option<&'static str> {
    match kind {
        BackendKind::Wgpu => Some("wgsl"),
        BackendKind::Vulkan => Some("spirv"),
        BackendKind::Metal => Some("msl"),
        BackendKind::Cpu | BackendKind::Auto => None,
    }
}

/// The compilers an adapter can run kiln's kernels with in this build, each with the
/// `backend.kind` that picks it.
pub fn compilers_for(adapter: &AdapterSummary) -> Vec<String> {
    let mut out = vec!["wgsl (backend.kind: wgpu)".to_string()];
    match adapter.backend.as_str() {
        // CubeCL's SPIR-V crashes lavapipe (FACTS.md): software adapters keep WGSL.
        "Vulkan" if adapter.software => {}
        "Vulkan" if cfg!(feature = "vulkan") => out.push("spirv (backend.kind: vulkan)".into()),
        "Vulkan" => {
            out.push("spirv (backend.kind: vulkan, in a build with --features vulkan)".into())
        }
        "Metal" if cfg!(target_os = "macos") => out.push("msl (backend.kind: metal)".into()),
        _ => {}
    }
    out
}

/// Opens the device the config asks for; `auto` prefers Metal on macOS, then a hardware GPU
/// through wgpu, then the CPU. A software adapter is used only when asked for.
pub fn select(config: &BackendConfig) -> Result<SelectedDevice, TrainError> {
    select_for_rank(config, None)
}

/// [`select`] for one of several ranks: `local_rank` (its place among the ranks on this machine)
/// picks its hardware GPU, so ranks on a machine with several GPUs each take their own.
pub fn select_for_rank(
    config: &BackendConfig,
    local_rank: Option<usize>,
) -> Result<SelectedDevice, TrainError> {
    match config.kind {
        BackendKind::Cpu => Ok(cpu_device()),
        BackendKind::Wgpu => wgpu_device(config.adapter, local_rank),
        BackendKind::Metal => metal_device(),
        BackendKind::Vulkan => vulkan_device(config.adapter, local_rank),
        BackendKind::Auto => {
            if config.adapter == AdapterChoice::Software {
                return wgpu_device(AdapterChoice::Software, None);
            }
            if cfg!(target_os = "macos") {
                return metal_device();
            }
            if list_adapters().iter().any(|a| !a.software) {
                return wgpu_device(AdapterChoice::Default, local_rank);
            }
            Ok(cpu_device())
        }
    }
}

#[cfg(target_os = "macos")]
fn metal_device() -> Result<SelectedDevice, TrainError> {
    let found = list_adapters().into_iter().find(|a| a.backend == "Metal");
    let budget = found.as_ref().and_then(gpu_budget);
    let name = found
        .map(|a| a.name)
        .unwrap_or_else(|| "default Metal device".into());
    Ok(SelectedDevice {
        budget,
        device: Device::metal(DeviceKind::DefaultDevice),
        kind: BackendKind::Metal,
        description: format!("metal: {name}, compiler: msl"),
    })
}

#[cfg(not(target_os = "macos"))]
fn metal_device() -> Result<SelectedDevice, TrainError> {
    Err(TrainError::Device(
        "backend.kind: metal needs macOS; use auto, wgpu or cpu here".into(),
    ))
}

#[cfg(feature = "vulkan")]
fn vulkan_device(
    adapter: AdapterChoice,
    local_rank: Option<usize>,
) -> Result<SelectedDevice, TrainError> {
    let (kind, mut selected) = open_wgpu(adapter, local_rank)?;
    selected.device = Device::vulkan(kind);
    selected.kind = BackendKind::Vulkan;
    selected.description = selected
        .description
        .replacen("wgpu:", "vulkan:", 1)
        .replacen("compiler: wgsl", "compiler: spirv", 1);
    Ok(selected)
}

#[cfg(not(feature = "vulkan"))]
fn vulkan_device(_: AdapterChoice, _: Option<usize>) -> Result<SelectedDevice, TrainError> {
    Err(TrainError::Device(
        "backend.kind: vulkan needs kiln built with `--features vulkan`; backend.kind: wgpu \
         reaches Vulkan through WGSL without it"
            .into(),
    ))
}

/// Bytes the device's memory pool has reserved (GPU backends): pools keep what they reserved, so
/// this is the high-water mark of what the run needed, as the device sees it.
pub fn device_memory_reserved(device: &Device) -> Option<u64> {
    device.memory_pool_usage().map(|u| u.bytes_reserved)
}

/// Bytes the device's allocator holds now (GPU backends), if it reports them.
pub fn device_memory_in_use(device: &Device) -> Option<u64> {
    device.memory_pool_usage().map(|u| u.bytes_in_use)
}

/// Refuses a `train.dtype` the device can't compute in (bf16 in WGSL, for one).
pub fn check_dtype(
    selected: &SelectedDevice,
    dtype: kiln_config::ComputeDtype,
) -> Result<(), TrainError> {
    let float = compute_dtype(dtype);
    if float == burn::tensor::FloatDType::F32 {
        return Ok(());
    }
    let name = match dtype {
        kiln_config::ComputeDtype::Bf16 => "bf16",
        _ => "f16",
    };
    if selected
        .device
        .supports_dtype(burn::tensor::DType::from(float))
    {
        Ok(())
    } else {
        Err(TrainError::Device(format!(
            "train.dtype: {name} is not supported on {} (use f32{})",
            selected.description,
            if name == "bf16" { ", or f16" } else { "" }
        )))
    }
}

/// Burn's float type for `train.dtype`.
pub fn compute_dtype(dtype: kiln_config::ComputeDtype) -> burn::tensor::FloatDType {
    use burn::tensor::FloatDType;
    match dtype {
        kiln_config::ComputeDtype::F32 => FloatDType::F32,
        kiln_config::ComputeDtype::Bf16 => FloatDType::BF16,
        kiln_config::ComputeDtype::F16 => FloatDType::F16,
    }
}
