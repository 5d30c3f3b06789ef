;; Misbehaving OUT-filter: claims to have chosen a million sinks.
(module
  (memory (export "memory") 2)
  (func (export "kecho_buffer") (result i32) (i32.const 1024))
  (func (export "kecho_select") (param $len i32) (result i32) (i32.const 1000000)))
