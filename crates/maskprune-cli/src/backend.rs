//! Picking the burn backend from `--device`: every command is written once, generic over
//! the backend, and dispatched here.

use std::str::FromStr;

use anyhow::Context;

use maskprune_model::{Kernels, TrainKernels};

/// The `--device` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// burn-flex on the CPU (faster than burn-ndarray here: see DEVELOPERS.md, "Speed").
    Cpu,
    /// burn-cuda on GPU N.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A command body generic over the backend.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B` and `device`.
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

/// Runs `job` on the backend `device` names.
pub fn dispatch<J: BackendJob>(device: DeviceArg, job: J) -> anyhow::Result<J::Output> {
    match device {
        DeviceArg::Cpu => job.run::<burn::backend::Flex>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(n) => {
            job.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(n))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(_) => {
            anyhow::bail!("this maskprune was built without CUDA; rebuild with `--features cuda`")
        }
    }
}

/// A command body that needs gradients (mask training), generic over an autodiff backend.
pub trait AutodiffJob: Sized {
    /// What the job returns.
    type Output;
    /// Runs the job on autodiff backend `B` and `device`.
    fn run<B: TrainKernels>(self, device: B::Device) -> anyhow::Result<Self::Output>;
    /// Runs the job on several devices of backend `B`; jobs that use only one take the first.
    fn run_on<B: TrainKernels>(self, devices: Vec<B::Device>) -> anyhow::Result<Self::Output> {
        let first = devices.into_iter().next().expect("at least one device");
        self.run::<B>(first)
    }
}

/// Runs `job` on the autodiff version of the backend `device` names.
pub fn dispatch_autodiff<J: AutodiffJob>(device: DeviceArg, job: J) -> anyhow::Result<J::Output> {
    dispatch_autodiff_on(&[device], job)
}

/// Runs `job` on the autodiff version of the backend `devices` name (all of one kind).
pub fn dispatch_autodiff_on<J: AutodiffJob>(
    devices: &[DeviceArg],
    job: J,
) -> anyhow::Result<J::Output> {
    use burn::backend::Autodiff;
    let first = *devices.first().context("no device given")?;
    anyhow::ensure!(
        devices
            .iter()
            .all(|d| matches!(d, DeviceArg::Cpu) == matches!(first, DeviceArg::Cpu)),
        "--devices {}: one kind of device per run (cpu,cpu or cuda:0,cuda:1)",
        devices
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    match first {
        DeviceArg::Cpu => {
            job.run_on::<Autodiff<burn::backend::Flex>>(vec![Default::default(); devices.len()])
        }
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(_) => job.run_on::<Autodiff<burn::backend::Cuda>>(
            devices
                .iter()
                .map(|d| match d {
                    DeviceArg::Cuda(n) => burn::backend::cuda::CudaDevice::new(*n),
                    DeviceArg::Cpu => unreachable!("checked above"),
                })
                .collect(),
        ),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(_) => {
            anyhow::bail!("this maskprune was built without CUDA; rebuild with `--features cuda`")
        }
    }
}

/// A comma-separated device list: `cpu,cpu` or `cuda:0,cuda:1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceArg>);

impl FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|d| d.trim().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(DeviceList)
    }
}
