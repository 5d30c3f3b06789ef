//! Inspection modules (`kecho inspect --module FILE.wat`): a WebAssembly program that travels with an inspection
//! request and runs on every node it reaches, sandboxed with the limits of kecho's filters
//! ([`kecho::wasm::WasmLimits`]: fuel, memory and wall time), and without imports: it can compute over what the node
//! hands it, nothing else.
//!
//! The ABI (version 1): the module exports `memory`, `kecho_buffer() -> i32` (where the host writes the input; at
//! least [`BUFFER`] bytes) and `kecho_inspect(len: i32) -> i32`. The host writes the node's report (the JSON of
//! [`crate::inspect::NodeReport`]) at the buffer and calls `kecho_inspect` with its length; the module writes its
//! answer at the buffer and returns its length (0 to [`BUFFER`]). The answer is returned as text. A module that traps,
//! runs out of fuel or time, grows its memory past the limit, or returns a length out of range gives an error, never
//! a crash of the node.

use std::sync::OnceLock;
use std::time::Duration;

use kecho::wasm::WasmLimits;
use wasmtime::{Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};

/// The input and output region a module must offer.
pub const BUFFER: usize = 64 * 1024;
/// The largest module accepted, bytes.
pub const MAX_MODULE: usize = 1 << 20;
/// The epoch ticks this often; wall time is counted in ticks.
const TICK: Duration = Duration::from_millis(1);

/// Why a module gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// The module is larger than [`MAX_MODULE`].
    #[error("the module is {len} bytes; at most {MAX_MODULE}")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// The sandbox could not be set up.
    #[error("the WebAssembly sandbox: {0}")]
    Sandbox(String),
    /// The module does not compile or instantiate.
    #[error("the module does not load: {0}")]
    Load(String),
    /// An export the ABI needs is missing.
    #[error("the module does not export {0}")]
    MissingExport(&'static str),
    /// The module trapped, ran out of fuel or wall time, or grew its memory past the limit.
    #[error("the module failed: {0}")]
    Trapped(String),
    /// The buffer or the answer's length is out of range.
    #[error("the module's {what} is out of range ({value})")]
    OutOfRange {
        /// Which value.
        what: &'static str,
        /// The value.
        value: i64,
    },
}

fn engine() -> Result<&'static Engine, ModuleError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let mut cfg = Config::new();
        cfg.consume_fuel(true).epoch_interruption(true);
        let engine = Engine::new(&cfg).map_err(|e| e.to_string())?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("kecho-inspect-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .map_err(|e| e.to_string())?;
        Ok(engine)
    });
    engine.as_ref().map_err(|e| ModuleError::Sandbox(e.clone()))
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()).max(1) as u64
}

/// Runs inspection module `module` (binary or text format) over `input` within `limits`; its answer as text.
/// Blocking (at most the wall-time limit per call once compiled): call it from a blocking thread.
pub fn run(module: &[u8], input: &[u8], limits: WasmLimits) -> Result<String, ModuleError> {
    if module.len() > MAX_MODULE {
        return Err(ModuleError::TooLarge { len: module.len() });
    }
    let engine = engine()?;
    let module = Module::new(engine, module).map_err(|e| ModuleError::Load(format!("{e:#}")))?;
    let limiter: StoreLimits = StoreLimitsBuilder::new().memory_size(limits.memory).instances(1).tables(4).build();
    let mut store = Store::new(engine, limiter);
    store.limiter(|l| l);
    let arm = |store: &mut Store<StoreLimits>| {
        store.set_epoch_deadline(ticks(limits.wall_time));
        store.set_fuel(limits.fuel).map_err(|e| ModuleError::Sandbox(e.to_string()))
    };
    arm(&mut store)?;
    let instance =
        Linker::new(engine).instantiate(&mut store, &module).map_err(|e| ModuleError::Load(format!("{e:#}")))?;
    let memory = instance.get_memory(&mut store, "memory").ok_or(ModuleError::MissingExport("memory"))?;
    let buffer_fn = instance
        .get_typed_func::<(), i32>(&mut store, "kecho_buffer")
        .map_err(|_| ModuleError::MissingExport("kecho_buffer() -> i32"))?;
    let inspect = instance
        .get_typed_func::<i32, i32>(&mut store, "kecho_inspect")
        .map_err(|_| ModuleError::MissingExport("kecho_inspect(i32) -> i32"))?;
    arm(&mut store)?;
    let buffer = buffer_fn.call(&mut store, ()).map_err(|e| ModuleError::Trapped(format!("{e:#}")))?;
    let start =
        usize::try_from(buffer).map_err(|_| ModuleError::OutOfRange { what: "buffer", value: buffer.into() })?;
    if start.checked_add(BUFFER).is_none_or(|end| end > memory.data_size(&store)) {
        return Err(ModuleError::OutOfRange { what: "buffer", value: buffer.into() });
    }
    let input = &input[..input.len().min(BUFFER)];
    memory.data_mut(&mut store)[start..start + input.len()].copy_from_slice(input);
    arm(&mut store)?;
    let len = inspect.call(&mut store, input.len() as i32).map_err(|e| ModuleError::Trapped(format!("{e:#}")))?;
    let n = usize::try_from(len)
        .ok()
        .filter(|n| *n <= BUFFER)
        .ok_or(ModuleError::OutOfRange { what: "answer length", value: len.into() })?;
    // The memory may have grown (within its limit) during the call; the buffer is still where it was.
    let data = memory.data(&store);
    let answer =
        data.get(start..start + n).ok_or(ModuleError::OutOfRange { what: "answer length", value: len.into() })?;
    Ok(String::from_utf8_lossy(answer).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers with the input's length as one byte plus the first 8 bytes of the input.
    const ECHO: &str = r#"(module
        (memory (export "memory") 2)
        (func (export "kecho_buffer") (result i32) (i32.const 1024))
        (func (export "kecho_inspect") (param $len i32) (result i32) (i32.const 8)))"#;

    #[test]
    fn a_module_answers_from_the_input() {
        let out = run(ECHO.as_bytes(), br#"{"name":"a"}"#, WasmLimits::default()).unwrap();
        assert_eq!(out, r#"{"name":"#);
    }

    #[test]
    fn misbehaving_modules_give_errors() {
        let limits = WasmLimits::default();
        let spin = r#"(module (memory (export "memory") 2)
            (func (export "kecho_buffer") (result i32) (i32.const 0))
            (func (export "kecho_inspect") (param i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#;
        assert!(matches!(run(spin.as_bytes(), b"{}", limits), Err(ModuleError::Trapped(_))));
        let long = r#"(module (memory (export "memory") 2)
            (func (export "kecho_buffer") (result i32) (i32.const 0))
            (func (export "kecho_inspect") (param i32) (result i32) (i32.const 70000)))"#;
        assert!(matches!(run(long.as_bytes(), b"{}", limits), Err(ModuleError::OutOfRange { .. })));
        let small = r#"(module (memory (export "memory") 1)
            (func (export "kecho_buffer") (result i32) (i32.const 100))
            (func (export "kecho_inspect") (param i32) (result i32) (i32.const 0)))"#;
        assert!(matches!(run(small.as_bytes(), b"{}", limits), Err(ModuleError::OutOfRange { what: "buffer", .. })));
        let grow = r#"(module (memory (export "memory") 2)
            (func (export "kecho_buffer") (result i32) (i32.const 0))
            (func (export "kecho_inspect") (param i32) (result i32)
              (if (i32.lt_s (memory.grow (i32.const 1000)) (i32.const 0)) (then unreachable)) (i32.const 0)))"#;
        assert!(matches!(run(grow.as_bytes(), b"{}", limits), Err(ModuleError::Trapped(_))));
        assert!(matches!(run(b"not wasm", b"{}", limits), Err(ModuleError::Load(_))));
        let bare = r#"(module (memory (export "memory") 2))"#;
        assert!(matches!(run(bare.as_bytes(), b"{}", limits), Err(ModuleError::MissingExport(_))));
    }
}
