//! A sandboxed WebAssembly transform, run by wasmtime with fuel and memory limits, as kecho's filters are.
//!
//! ABI (version 1): the module exports `memory`, `kecho_buffer() -> i32` (offset of a region of at least 64 KiB)
//! and `kecho_transform(len: i32) -> i32`. The host writes up to 64 KiB of input at the buffer and calls
//! `kecho_transform(len)`; the module rewrites the region and returns the output length (at most 64 KiB), or a
//! negative number to fail the flow. The module has no imports: it can compute, nothing else. Running out of fuel
//! (per call), growing memory past the limit, or trapping stops the flow with a `Transform` error.

use std::path::Path;

use wasmtime::{Config, Engine, Instance, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, TypedFunc};

use crate::stage::{Chunk, Pool, Stage, Work};
use crate::FlowError;

/// Input handed to the module per call.
pub const BUFFER: usize = 64 * 1024;

/// A loaded WebAssembly transform.
pub struct WasmStage {
    store: Store<StoreLimits>,
    memory: Memory,
    buffer: usize,
    transform: TypedFunc<i32, i32>,
    fuel: u64,
    name: String,
}

impl std::fmt::Debug for WasmStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmStage").field("name", &self.name).finish()
    }
}

fn bad(m: impl std::fmt::Display) -> FlowError {
    FlowError::Transform(format!("wasm: {m}"))
}

impl WasmStage {
    /// Compiles and instantiates the module in `path` (text or binary format).
    pub fn load(path: &Path, fuel: u64, memory: usize) -> Result<Self, FlowError> {
        let bytes =
            std::fs::read(path).map_err(|e| FlowError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::new(&bytes, fuel, memory, path.display().to_string())
    }

    /// Compiles and instantiates `module`.
    pub fn new(module: &[u8], fuel: u64, memory: usize, name: String) -> Result<Self, FlowError> {
        let mut cfg = Config::new();
        cfg.consume_fuel(true);
        let engine = Engine::new(&cfg).map_err(bad)?;
        let module = Module::new(&engine, module).map_err(|e| FlowError::Config(format!("wasm module: {e:#}")))?;
        let limits = StoreLimitsBuilder::new().memory_size(memory).instances(1).tables(4).build();
        let mut store = Store::new(&engine, limits);
        store.limiter(|l| l);
        store.set_fuel(fuel).map_err(bad)?;
        let instance: Instance = Linker::new(&engine)
            .instantiate(&mut store, &module)
            .map_err(|e| FlowError::Config(format!("wasm: cannot instantiate: {e:#}")))?;
        let mem = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| FlowError::Config("wasm: no exported memory".into()))?;
        let buffer_fn = instance
            .get_typed_func::<(), i32>(&mut store, "kecho_buffer")
            .map_err(|_| FlowError::Config("wasm: no `kecho_buffer: () -> i32` export".into()))?;
        let transform = instance
            .get_typed_func::<i32, i32>(&mut store, "kecho_transform")
            .map_err(|_| FlowError::Config("wasm: no `kecho_transform: (i32) -> i32` export".into()))?;
        let buffer = buffer_fn.call(&mut store, ()).map_err(bad)?;
        let buffer = usize::try_from(buffer).map_err(|_| FlowError::Config("wasm: negative buffer offset".into()))?;
        if buffer.checked_add(BUFFER).is_none_or(|end| end > mem.data_size(&store)) {
            return Err(FlowError::Config(format!("wasm: the buffer must hold {BUFFER} bytes inside the memory")));
        }
        Ok(WasmStage { store, memory: mem, buffer, transform, fuel, name })
    }

    /// Runs the module on one piece of at most [`BUFFER`] bytes, appending its output to `out`.
    fn call(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), FlowError> {
        self.memory.write(&mut self.store, self.buffer, input).map_err(bad)?;
        self.store.set_fuel(self.fuel).map_err(bad)?;
        let n = self.transform.call(&mut self.store, input.len() as i32).map_err(|e| bad(format!("{e:#}")))?;
        let n = usize::try_from(n).map_err(|_| bad(format!("the module failed the input (returned {n})")))?;
        if n > BUFFER {
            return Err(bad(format!("output of {n} bytes exceeds the {BUFFER}-byte buffer")));
        }
        let data = self.memory.data(&self.store);
        let region = data.get(self.buffer..self.buffer + n).ok_or_else(|| bad("the buffer left the memory"))?;
        out.extend_from_slice(region);
        Ok(())
    }
}

impl Stage for WasmStage {
    fn name(&self) -> String {
        "wasm".into()
    }
    fn sequential(&mut self, chunk: &mut Chunk, work: &Work) -> Result<(), FlowError> {
        let n = chunk.len();
        let mut out = chunk.spare(n);
        let segs = std::mem::take(&mut chunk.segs);
        for r in &segs {
            for piece in chunk.buf[r.clone()].chunks(BUFFER) {
                self.call(piece, &mut out)?;
            }
        }
        // In and out of the sandbox's memory: two copies of each byte.
        work.copied.fetch_add((n + out.len()) as u64, std::sync::atomic::Ordering::Relaxed);
        chunk.replace(out);
        Ok(())
    }
    fn finish(&mut self, _: u64, _: &std::sync::Arc<Pool>) -> Result<Option<Chunk>, FlowError> {
        Ok(None)
    }
}
