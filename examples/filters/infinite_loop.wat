;; Misbehaving OUT-filter: never returns. The fuel limit stops it and the filter is disabled.
(module
  (memory (export "memory") 2)
  (func (export "kecho_buffer") (result i32) (i32.const 1024))
  (func (export "kecho_select") (param $len i32) (result i32)
    (loop $forever (br $forever))
    (i32.const -1)))
