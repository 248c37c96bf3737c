-- A sales cube over the bundled orders, prototyped locally and kept in the warehouse
-- (--warehouse, default .flumen/warehouse).      run: flumen run sql/examples/cube_orders.sql
-- Each query on the cube is answered by the grouping set of the dimensions it uses: one row
-- per group, so distinct counts and averages are exact at every level.
CREATE EXTERNAL TABLE orders STORED AS CSV LOCATION '${DATA:-data}/orders.csv'
  OPTIONS ('has_header' 'true');

DROP CUBE IF EXISTS sales;
CREATE CUBE sales FROM orders
  DIMENSIONS (month => date_trunc('month', created_at), city, status)
  MEASURES (revenue => sum(amount), orders => count(*), buyers => count(DISTINCT user_id),
            avg_amount => avg(amount))
  OPTIONS ('watermark' 'order_id');   -- mergeable states: REFRESH CUBE ... INCREMENTAL works

-- Later runs, after new orders arrive: only orders past the last order_id are read and merged.
REFRESH CUBE sales INCREMENTAL;

-- Roll-up: the grand total (the () set).
SELECT revenue, orders, buyers FROM sales;

-- Slice: one city, by status (the (city, status) set).
SELECT status, orders, buyers, round(avg_amount, 2) AS avg_amount
FROM sales WHERE city = 'Zürich' ORDER BY orders DESC;

-- Dice: two cities, delivered orders of 2021, by month.
SELECT month, city, revenue FROM sales
WHERE city IN ('Zürich', 'Milano') AND status = 'delivered'
  AND month >= '2021-01-01' AND month < '2022-01-01'
ORDER BY month, city LIMIT 6;

-- Drill-down: from cities to their months.
SELECT city, revenue FROM sales ORDER BY revenue DESC LIMIT 3;
SELECT city, month, revenue FROM sales WHERE city = 'Zürich' ORDER BY month DESC LIMIT 3;

-- Pivot by conditional aggregation: statuses as columns, one row per city.
SELECT city,
       sum(CASE WHEN status = 'delivered' THEN orders ELSE 0 END) AS delivered,
       sum(CASE WHEN status = 'cancelled' THEN orders ELSE 0 END) AS cancelled,
       sum(CASE WHEN status = 'returned'  THEN orders ELSE 0 END) AS returned
FROM sales GROUP BY city ORDER BY delivered DESC LIMIT 5;

-- The same cube on ClickHouse, fed by a materialized view from the raw orders there
-- (an AggregatingMergeTree of -State columns; answers by -Merge):
--   flumen cube ddl sales --raw-table shop.orders                  # prints the DDL and queries
--   flumen cube deploy sales --location 'http://default:@127.0.0.1:8123/shop' --raw-table shop.orders
