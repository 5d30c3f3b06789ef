;; Misbehaving OUT-filter: grows its memory until refused (the memory limit), then traps.
(module
  (memory (export "memory") 2)
  (func (export "kecho_buffer") (result i32) (i32.const 1024))
  (func (export "kecho_select") (param $len i32) (result i32)
    (loop $grow
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then (unreachable)))
      (br $grow))
    (i32.const -1)))
