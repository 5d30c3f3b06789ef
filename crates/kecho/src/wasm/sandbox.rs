//! The sandbox itself: wasmtime with fuel, memory and epoch (wall-time) limits, the ABI's input encoding, and the
//! fall-back when a module misbehaves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use kecho_proto::codec::{encode_attrs, FilterKind};
use parking_lot::Mutex;
use wasmtime::{Config, Engine, Instance, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, TypedFunc};

use super::{WasmError, WasmLimits, MAX_MODULE, MIN_BUFFER};
use crate::filter::{EventView, InDecision, InEvent, InFilter, LocalSinks, OutFilter, SinkView};

/// The epoch ticks every this long; wall-time limits are counted in ticks.
const TICK: Duration = Duration::from_millis(1);

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut cfg = Config::new();
        cfg.consume_fuel(true).epoch_interruption(true);
        let engine = Engine::new(&cfg).expect("the wasmtime configuration is valid");
        // One thread ticks the epoch for every store in the process: it is what bounds wall time.
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("kecho-wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .expect("spawn the epoch thread");
        engine
    })
}

struct Instance1 {
    store: Store<StoreLimits>,
    memory: Memory,
    buffer: usize,
    select: Option<TypedFunc<i32, i32>>,
    accept: Option<TypedFunc<i32, i32>>,
}

/// A compiled, instantiated filter module.
pub(crate) struct WasmFilter {
    kind: FilterKind,
    limits: WasmLimits,
    inst: Mutex<Instance1>,
    disabled: AtomicBool,
    input: Mutex<BytesMut>,
    on_fault: Box<dyn Fn(String) + Send + Sync>,
}

impl std::fmt::Debug for WasmFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmFilter").field("kind", &self.kind).finish()
    }
}

impl WasmFilter {
    /// Compiles and instantiates `module` (binary or text format) as a filter of `kind`. `on_fault` is called once
    /// if the module is ever disabled.
    pub(crate) fn new(
        kind: FilterKind,
        module: &[u8],
        limits: WasmLimits,
        on_fault: Box<dyn Fn(String) + Send + Sync>,
    ) -> Result<Self, WasmError> {
        if module.len() > MAX_MODULE {
            return Err(WasmError::TooLarge { len: module.len() });
        }
        let engine = engine();
        let module = Module::new(engine, module).map_err(|e| WasmError::Compile { message: format!("{e:#}") })?;
        let limiter = StoreLimitsBuilder::new().memory_size(limits.memory).instances(1).tables(4).build();
        let mut store = Store::new(engine, limiter);
        store.limiter(|l| l);
        store.set_fuel(limits.fuel).map_err(|e| WasmError::Limits { message: e.to_string() })?;
        store.set_epoch_deadline(ticks(limits.wall_time));
        // No imports: a filter can compute, nothing else.
        let instance: Instance = Linker::new(engine)
            .instantiate(&mut store, &module)
            .map_err(|e| WasmError::Instantiate { message: format!("{e:#}") })?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(WasmError::MissingExport { name: "memory", signature: "memory" })?;
        let buffer_fn = instance
            .get_typed_func::<(), i32>(&mut store, "kecho_buffer")
            .map_err(|_| WasmError::MissingExport { name: "kecho_buffer", signature: "() -> i32" })?;
        store.set_fuel(limits.fuel).map_err(|e| WasmError::Limits { message: e.to_string() })?;
        store.set_epoch_deadline(ticks(limits.wall_time));
        let buffer =
            buffer_fn.call(&mut store, ()).map_err(|e| WasmError::BufferTrapped { message: format!("{e:#}") })?;
        let offset = i64::from(buffer);
        let buffer = usize::try_from(buffer).map_err(|_| WasmError::BadBuffer { offset })?;
        if buffer.checked_add(MIN_BUFFER).is_none_or(|end| end > memory.data_size(&store)) {
            return Err(WasmError::BadBuffer { offset });
        }
        let (select, accept) = match kind {
            FilterKind::Out => (
                Some(
                    instance
                        .get_typed_func::<i32, i32>(&mut store, "kecho_select")
                        .map_err(|_| WasmError::MissingExport { name: "kecho_select", signature: "(i32) -> i32" })?,
                ),
                None,
            ),
            FilterKind::In => (
                None,
                Some(
                    instance
                        .get_typed_func::<i32, i32>(&mut store, "kecho_accept")
                        .map_err(|_| WasmError::MissingExport { name: "kecho_accept", signature: "(i32) -> i32" })?,
                ),
            ),
        };
        Ok(WasmFilter {
            kind,
            limits,
            inst: Mutex::new(Instance1 { store, memory, buffer, select, accept }),
            disabled: AtomicBool::new(false),
            input: Mutex::new(BytesMut::with_capacity(4096)),
            on_fault,
        })
    }

    /// True once the module misbehaved.
    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    fn fault(&self, reason: String) {
        if !self.disabled.swap(true, Ordering::AcqRel) {
            tracing::warn!(kind = ?self.kind, "sandboxed filter disabled: {reason}");
            (self.on_fault)(reason);
        }
    }

    /// Runs the module on `input`; returns its result and the buffer contents it may have written, or the fault.
    fn call(&self, input: &[u8], out: &mut Vec<u32>, max_out: usize) -> Result<i32, CallError> {
        let mut g = self.inst.lock();
        let inst = &mut *g;
        if input.len() > MIN_BUFFER {
            // Not the module's fault: skip it for this event.
            return Err(CallError::Skip);
        }
        inst.memory
            .write(&mut inst.store, inst.buffer, input)
            .map_err(|_| CallError::Fault("the buffer is no longer inside the memory".into()))?;
        inst.store.set_fuel(self.limits.fuel).map_err(|e| CallError::Fault(e.to_string()))?;
        inst.store.set_epoch_deadline(ticks(self.limits.wall_time));
        let f = inst
            .select
            .as_ref()
            .or(inst.accept.as_ref())
            .ok_or_else(|| CallError::Fault("no entry point".into()))?
            .clone();
        let r = f.call(&mut inst.store, input.len() as i32).map_err(|e| CallError::Fault(describe_trap(&e)))?;
        if r > 0 && inst.select.is_some() {
            let n = r as usize;
            if n > max_out {
                return Err(CallError::Fault(format!("returned {n} sinks, there are {max_out}")));
            }
            let mut raw = vec![0u8; n * 4];
            inst.memory
                .read(&inst.store, inst.buffer, &mut raw)
                .map_err(|_| CallError::Fault("cannot read the answer".into()))?;
            out.clear();
            out.extend(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        Ok(r)
    }
}

/// Why a call of the module gave no answer.
enum CallError {
    /// Not the module's fault (the input does not fit its buffer): skip it for this event.
    Skip,
    /// The module misbehaved; it is disabled.
    Fault(String),
}

fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64 + 1
}

fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => "ran out of fuel (CPU limit)".into(),
        Some(wasmtime::Trap::Interrupt) => "exceeded its wall-time limit".into(),
        Some(t) => format!("trapped: {t}"),
        None => format!("failed: {e:#}"),
    }
}

fn encode_input(buf: &mut BytesMut, event: (&str, &kecho_proto::Attrs, &[u8]), sinks: &[(&kecho_proto::Attrs, u64)]) {
    buf.clear();
    buf.put_u32_le(1);
    buf.put_u32_le(sinks.len() as u32);
    buf.put_u32_le(16);
    buf.put_u32_le(0);
    buf.put_u32_le(event.0.len() as u32);
    buf.put_slice(event.0.as_bytes());
    encode_attrs(buf, event.1);
    buf.put_u32_le(event.2.len() as u32);
    buf.put_slice(event.2);
    let sinks_at = buf.len() as u32;
    buf[12..16].copy_from_slice(&sinks_at.to_le_bytes());
    for (attrs, age) in sinks {
        encode_attrs(buf, attrs);
        buf.put_u64_le(*age);
    }
}

/// A sandboxed OUT-filter.
pub(crate) struct WasmOut(pub(crate) Arc<WasmFilter>);

impl OutFilter for WasmOut {
    fn select(&self, event: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>) {
        let all = |chosen: &mut Vec<usize>| chosen.extend(0..sinks.len());
        if self.0.is_disabled() {
            return all(chosen);
        }
        let list: Vec<(&kecho_proto::Attrs, u64)> =
            sinks.iter().map(|s| (s.attrs(), s.age().as_millis() as u64)).collect();
        let mut input = self.0.input.lock();
        encode_input(&mut input, (event.ty(), event.attrs(), event.payload()), &list);
        let mut picked = Vec::new();
        match self.0.call(&input, &mut picked, sinks.len()) {
            Ok(-1) => all(chosen),
            Ok(0) => {}
            Ok(n) if n > 0 => {
                if let Some(bad) = picked.iter().find(|&&i| i as usize >= sinks.len()) {
                    self.0.fault(format!("chose sink {bad}, there are {}", sinks.len()));
                    return all(chosen);
                }
                chosen.extend(picked.iter().map(|&i| i as usize));
            }
            Ok(n) => {
                self.0.fault(format!("returned {n}"));
                all(chosen)
            }
            Err(CallError::Skip) => all(chosen),
            Err(CallError::Fault(e)) => {
                self.0.fault(e);
                all(chosen)
            }
        }
    }
}

/// A sandboxed IN-filter.
pub(crate) struct WasmIn(pub(crate) Arc<WasmFilter>);

impl InFilter for WasmIn {
    fn filter(&self, event: &mut InEvent<'_>, sinks: &LocalSinks<'_>) -> InDecision {
        if self.0.is_disabled() {
            return InDecision::Deliver;
        }
        let list: Vec<(&kecho_proto::Attrs, u64)> = (0..sinks.len()).map(|i| (sinks.attrs(i), 0)).collect();
        let mut input = self.0.input.lock();
        encode_input(&mut input, (event.ty(), event.attrs(), event.payload()), &list);
        match self.0.call(&input, &mut Vec::new(), 0) {
            Ok(1) => InDecision::Deliver,
            Ok(0) => InDecision::Drop,
            Ok(n) => {
                self.0.fault(format!("returned {n} (expected 0 or 1)"));
                InDecision::Deliver
            }
            Err(CallError::Skip) => InDecision::Deliver,
            Err(CallError::Fault(e)) => {
                self.0.fault(e);
                InDecision::Deliver
            }
        }
    }
}
